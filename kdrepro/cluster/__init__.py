"""The pipeline's DVC stages as scheduler jobs: ``kdrepro launch`` and ``kdrepro status``.

Every stage that is out of date (``dvc status``) and everything downstream of it becomes one job, submitted with
submitit, either to SLURM (``--executor slurm``: one ``sbatch`` per stage, ``--dependency=afterok:<upstream ids>``,
so the scheduler itself starts a stage when its upstream succeeded and cancels the downstream of a failed one) or to
this machine (``--executor local --workers N``: the launcher starts ready stages on N slots). A job runs
``dvc --wait-for-lock repro --single-item <stage>``: DVC itself decides whether the stage changed, runs its unchanged
command with the repository lock released, and records it in ``dvc.lock`` under the lock, so ``dvc.lock`` ends as a
sequential ``dvc repro`` leaves it.

Modules: :mod:`.dag` (which stages, in which order), :mod:`.resources` (what each job asks for),
:mod:`.job` (what a job runs), :mod:`.launch` (submission), :mod:`.status` (queued / running / done / failed).
"""
