"""CIRKD: relation losses against explicit loops, the class queues' pointer arithmetic, checkpointing, DDP (gloo)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrepro.config import load_config
from kdrepro.distill import build
from kdrepro.distill.cirkd import CIRKD, memory_contrast_loss, minibatch_pixel_pair_loss
from kdrepro.distill.cirkd_memory import ClassEmbeddingQueues, _last_write_per_slot, sample_without_replacement
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}
SMALL = {"pixel_memory_size": 40, "region_memory_size": 8}


def outputs(batch: int, seed: int = 0, size: int = 8) -> tuple[SegOutput, SegOutput, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = SegOutput(
        logits=torch.randn(batch, 19, size, size, generator=generator).requires_grad_(),
        features={"decoder": torch.randn(batch, 8, size, size, generator=generator).requires_grad_()},
    )
    teacher = SegOutput(
        logits=torch.randn(batch, 19, size, size, generator=generator),
        features={"decoder": torch.randn(batch, 32, size, size, generator=generator)},
    )
    target = torch.randint(0, 19, (batch, size * 8, size * 8), generator=generator)
    return student, teacher, target


# ---------------------------------------------------------------- mini-batch pixel-to-pixel relation ---------------


def relation_loss_by_loops(student: torch.Tensor, teacher: torch.Tensor, tau: float, groups: list[list[int]]) -> float:
    """Row-wise KL between softmaxed cross-image similarity matrices, one scalar at a time."""

    def unit(feature: torch.Tensor, image: int, pixel: int) -> list[float]:
        vector = feature[image, :, pixel // feature.shape[3], pixel % feature.shape[3]].tolist()
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector]

    pixels = student.shape[2] * student.shape[3]
    total, pairs = 0.0, 0
    for group in groups:
        for i, j in itertools.product(group, group):
            pairs += 1
            for u in range(pixels):
                rows = []
                for feature in (student, teacher):
                    sims = [
                        sum(a * b for a, b in zip(unit(feature, i, u), unit(feature, j, v), strict=True)) / tau
                        for v in range(pixels)
                    ]
                    z = sum(math.exp(s) for s in sims)
                    rows.append([math.exp(s) / z for s in sims])
                p_s, p_t = rows
                total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True)) / pixels
    return total / pairs


def test_minibatch_loss_matches_explicit_loops_on_two_images():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 2, 2, dtype=torch.float64)  # 3-dim student, 4-dim teacher: no projection needed
    teacher = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    expected = relation_loss_by_loops(student, teacher, 0.5, [[0, 1]])
    assert minibatch_pixel_pair_loss(student, teacher, 0.5, pair_group_size=2).item() == pytest.approx(
        expected, rel=1e-9
    )
    assert minibatch_pixel_pair_loss(student, teacher, 0.5, pair_group_size=None).item() == pytest.approx(
        expected, rel=1e-9
    )
    assert expected > 0.01


@pytest.mark.parametrize(
    ("batch", "group_size", "groups"),
    [(4, 2, [[0, 1], [2, 3]]), (3, 2, [[0, 1], [2]]), (3, None, [[0, 1, 2]]), (1, 2, [[0]])],
)
def test_minibatch_loss_pairing_groups(batch, group_size, groups):
    torch.manual_seed(1)
    student = torch.randn(batch, 3, 2, 2, dtype=torch.float64)
    teacher = torch.randn(batch, 5, 2, 2, dtype=torch.float64)
    expected = relation_loss_by_loops(student, teacher, 0.1, groups)
    actual = minibatch_pixel_pair_loss(student, teacher, 0.1, pair_group_size=group_size)
    assert actual.item() == pytest.approx(expected, rel=1e-9)


def test_minibatch_loss_is_zero_for_identical_relations_and_positive_otherwise():
    torch.manual_seed(2)
    features = torch.randn(4, 6, 3, 3)
    scale = torch.rand(4, 1, 3, 3) + 0.5  # per-pixel positive rescaling: same L2-normalised embedding
    assert minibatch_pixel_pair_loss(features * scale, features).item() == pytest.approx(0.0, abs=1e-6)
    assert minibatch_pixel_pair_loss(torch.randn(4, 6, 3, 3), features).item() > 1e-3


# ---------------------------------------------------------------- memory-based relation ------------------------------


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
def test_memory_contrast_loss_matches_explicit_loops(kd_temperature):
    torch.manual_seed(3)
    student = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    teacher = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    tau = 0.1
    total = 0.0
    for anchor in range(3):
        dists = []
        for embeddings in (student, teacher):
            logits = [
                sum(embeddings[anchor, d].item() * queue[q, d].item() for d in range(4)) / tau / kd_temperature
                for q in range(5)
            ]
            z = sum(math.exp(v) for v in logits)
            dists.append([math.exp(v) / z for v in logits])
        p_s, p_t = dists
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))
    expected = total / 3 * kd_temperature**2
    actual = memory_contrast_loss(student, teacher, queue, tau, kd_temperature)
    assert actual.item() == pytest.approx(expected, rel=1e-9)
    assert memory_contrast_loss(teacher, teacher, queue, tau, kd_temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_memory_contrast_loss_mask_equals_subset():
    torch.manual_seed(4)
    student, teacher = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    queue = F.normalize(torch.randn(7, 4), dim=1)
    valid = torch.tensor([True, False, True, True, False, True])
    masked = memory_contrast_loss(student, teacher, queue, valid=valid)
    subset = memory_contrast_loss(student[valid], teacher[valid], queue)
    assert masked.item() == pytest.approx(subset.item(), rel=1e-6)
    none_valid = memory_contrast_loss(student, teacher, queue, valid=torch.zeros(6, dtype=torch.bool))
    assert none_valid.item() == 0.0


# ---------------------------------------------------------------- queues ---------------------------------------------


def test_sample_without_replacement_gives_distinct_uniform_draws():
    torch.manual_seed(5)
    counts = torch.tensor([0, 1, 3, 5, 100])
    draws = sample_without_replacement(counts, 4)
    for n, row in zip(counts.tolist(), draws.tolist(), strict=True):
        picked = [v for v in row if v >= 0]
        assert len(picked) == min(n, 4) and len(set(picked)) == len(picked) and all(0 <= v < n for v in picked)
        assert row[len(picked) :] == [-1] * (4 - len(picked))
    frequency = torch.zeros(5)
    for _ in range(400):
        frequency += torch.bincount(sample_without_replacement(torch.tensor([5]), 2)[0], minlength=5)
    assert torch.all((frequency / 400 - 0.4).abs() < 0.08)  # each of 5 values is picked with probability 2/5


def reference_enqueue(queues: ClassEmbeddingQueues, embeddings: torch.Tensor, labels: torch.Tensor):
    """The release's sequential loop (images × present classes), taking all pixels of a class (k = n here)."""
    pixel_queue, region_queue = queues.pixel_queue.clone(), queues.region_queue.clone()
    pixel_ptr, region_ptr = queues.pixel_queue_ptr.clone(), queues.region_queue_ptr.clone()
    size_p, size_r = pixel_queue.shape[1], region_queue.shape[1]
    for image in range(embeddings.shape[0]):
        feature = embeddings[image].flatten(1)
        label = labels[image].flatten()
        for c in sorted(set(label.tolist()) - {queues.ignore_index}):
            index = (label == c).nonzero()[:, 0]
            region_queue[c, int(region_ptr[c])] = F.normalize(feature[:, index].mean(dim=1), dim=0)
            region_ptr[c] = (region_ptr[c] + 1) % size_r
            k, ptr = len(index), int(pixel_ptr[c])
            if ptr + k >= size_p:
                pixel_queue[c, size_p - k :] = feature[:, index].T
                pixel_ptr[c] = 0
            else:
                pixel_queue[c, ptr : ptr + k] = feature[:, index].T
                pixel_ptr[c] = ptr + k
    return pixel_queue, pixel_ptr, region_queue, region_ptr


def test_enqueue_matches_sequential_loop_and_wraps():
    torch.manual_seed(6)
    queues = ClassEmbeddingQueues(num_classes=3, dim=4, pixel_memory_size=7, region_memory_size=3, pixels_per_image=16)
    for step in range(3):  # several batches: pointers wrap for every class
        embeddings = F.normalize(torch.randn(2, 4, 2, 2), dim=1)
        labels = (
            torch.tensor([[[0, 0], [1, 255]], [[0, 2], [2, 2]]])
            if step != 1
            else torch.tensor([[[2, 2], [2, 2]], [[1, 1], [0, 255]]])
        )
        expected = reference_enqueue(queues, embeddings, labels)
        queues.enqueue(embeddings, labels)
        pixel_queue, pixel_ptr, region_queue, region_ptr = expected
        assert torch.equal(queues.pixel_queue_ptr, pixel_ptr) and torch.equal(queues.region_queue_ptr, region_ptr)
        torch.testing.assert_close(queues.region_queue, region_queue)
        for c in range(3):  # within one image's block the order of the sampled pixels is random: compare as sets
            assert sorted(map(tuple, queues.pixel_queue[c].tolist())) == sorted(map(tuple, pixel_queue[c].tolist()))


def test_enqueue_overlapping_wrap_within_one_batch_keeps_the_later_image():
    queues = ClassEmbeddingQueues(num_classes=1, dim=2, pixel_memory_size=5, region_memory_size=3, pixels_per_image=2)
    # 4 images, 2 pixels of class 0 each; pixel embedding = (image, pixel index)
    embeddings = torch.stack([torch.tensor([[[float(b), float(b)]], [[0.0, 1.0]]]) for b in range(4)])  # (4, 2, 1, 2)
    labels = torch.zeros(4, 1, 2, dtype=torch.long)
    queues.enqueue(embeddings, labels)
    images = queues.pixel_queue[0, :, 0].tolist()
    # image0 -> [0, 2), image1 -> [2, 4), image2 wraps -> last 2 slots [3, 5), image3 -> [0, 2); pointer ends at 2
    assert images == [3.0, 3.0, 1.0, 2.0, 2.0]
    assert sorted(queues.pixel_queue[0, 3:, 1].tolist()) == [0.0, 1.0]
    assert queues.pixel_queue_ptr.tolist() == [2]
    assert queues.region_queue_ptr.tolist() == [4 % 3]
    assert queues.region_queue[0, :, 0].tolist() == pytest.approx(  # 4 regions into 3 slots: image 3 overwrites slot 0
        [3 / math.sqrt(9 + 0.25), 1 / math.sqrt(1 + 0.25), 2 / math.sqrt(4 + 0.25)]
    )


def test_enqueue_samples_only_class_pixels_or_the_released_positions():
    torch.manual_seed(7)
    embeddings = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 2, 4, 4).clone()  # embedding = raster position
    labels = torch.tensor([[[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 255]]])
    fixed = ClassEmbeddingQueues(2, 2, pixel_memory_size=10, region_memory_size=2, pixels_per_image=3)
    fixed.enqueue(embeddings, labels)
    class0 = {8, 9, 12, 13, 14}
    assert set(fixed.pixel_queue[0, :3, 0].tolist()) <= class0 and len(set(fixed.pixel_queue[0, :3, 0].tolist())) == 3
    released = ClassEmbeddingQueues(
        2, 2, pixel_memory_size=10, region_memory_size=2, pixels_per_image=3, released_pixel_sampling=True
    )
    released.enqueue(embeddings, labels)
    assert set(released.pixel_queue[0, :3, 0].tolist()) <= set(range(5))  # the first n_0 = 5 raster positions
    assert fixed.pixel_queue_ptr.tolist() == released.pixel_queue_ptr.tolist() == [3, 3]


def test_sample_uses_same_positions_for_every_class_and_global_rng():
    queues = ClassEmbeddingQueues(3, 2, pixel_memory_size=6, region_memory_size=2)
    torch.manual_seed(8)
    first = queues.sample(queues.pixel_queue, 4)
    torch.manual_seed(8)
    index = torch.randperm(6)[:4]
    assert torch.equal(first, queues.pixel_queue[:, index].reshape(-1, 2))
    assert queues.sample(queues.region_queue, 5).shape == (3 * 2, 2)  # capped at the queue length


# ---------------------------------------------------------------- the Distiller ---------------------------------------


def test_distiller_terms_equal_the_weighted_functions():
    torch.manual_seed(9)
    distiller = CIRKD(STUDENT, TEACHER, weight=2.0, **SMALL)
    student, teacher, target = outputs(batch=2)
    queues = {k: v.clone() for k, v in distiller.memory.state_dict().items()}
    torch.manual_seed(10)
    losses = distiller(student, teacher, target)
    assert set(losses) == {"cirkd_minibatch_pixel", "cirkd_memory_pixel", "cirkd_memory_region"}
    minibatch = minibatch_pixel_pair_loss(student.features["decoder"], teacher.features["decoder"], 0.1, 2)
    assert losses["cirkd_minibatch_pixel"].item() == pytest.approx(2.0 * minibatch.item(), rel=1e-5)
    # recompute the memory terms by hand from the same RNG state
    replay = ClassEmbeddingQueues(19, 32, **SMALL)
    replay.load_state_dict(queues)
    torch.manual_seed(10)
    labels = F.interpolate(target[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    teacher_embed = F.normalize(teacher.features["decoder"], dim=1)
    replay.enqueue(teacher_embed, labels)
    pixel_contrast = replay.sample(replay.pixel_queue, 4096 // 19 + 1)
    region_contrast = replay.sample(replay.region_queue, 1024 // 19 + 1)
    student_embed = F.normalize(distiller.embed_head(student.features["decoder"]), dim=1)
    s_anchor, t_anchor = (x.permute(0, 2, 3, 1).reshape(-1, 32) for x in (student_embed, teacher_embed))
    expected_pixel = 2.0 * 0.1 * memory_contrast_loss(s_anchor, t_anchor, pixel_contrast)
    expected_region = 2.0 * 0.1 * memory_contrast_loss(s_anchor, t_anchor, region_contrast)
    assert losses["cirkd_memory_pixel"].item() == pytest.approx(expected_pixel.item(), rel=1e-5)
    assert losses["cirkd_memory_region"].item() == pytest.approx(expected_region.item(), rel=1e-5)
    torch.testing.assert_close(distiller.memory.pixel_queue, replay.pixel_queue)


def test_gradients_reach_student_and_embedding_head_only():
    distiller = CIRKD(STUDENT, TEACHER, **SMALL)
    student, teacher, target = outputs(batch=2)
    sum(distiller(student, teacher, target).values()).backward()
    assert student.features["decoder"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.embed_head.parameters())
    assert not any(buffer.requires_grad for buffer in distiller.memory.buffers())


def test_batch_size_one_and_all_ignored_labels():
    distiller = CIRKD(STUDENT, TEACHER, **SMALL)
    student, teacher, target = outputs(batch=1)
    losses = distiller(student, teacher, target)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["cirkd_memory_pixel"] > 0
    pointers = (distiller.memory.pixel_queue_ptr.clone(), distiller.memory.region_queue_ptr.clone())
    losses = distiller(student, teacher, torch.full_like(target, 255))
    assert losses["cirkd_memory_pixel"].item() == 0.0 and losses["cirkd_memory_region"].item() == 0.0
    assert losses["cirkd_minibatch_pixel"].item() > 0  # the mini-batch term uses every pixel, as released
    assert torch.equal(distiller.memory.pixel_queue_ptr, pointers[0])
    assert torch.equal(distiller.memory.region_queue_ptr, pointers[1])
    sum(losses.values()).backward()  # still in the graph


def test_student_equal_to_teacher_gives_zero_relation_loss():
    same = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
    distiller = CIRKD(same, same, lambda_memory_pixel=0.0, lambda_memory_region=0.0)
    student, _, target = outputs(batch=2)
    losses = distiller(student, student.detach(), target)
    assert set(losses) == {"cirkd_minibatch_pixel"} and losses["cirkd_minibatch_pixel"].item() == pytest.approx(
        0, abs=1e-6
    )


def test_deterministic_with_a_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(11)
        distiller = CIRKD(STUDENT, TEACHER, **SMALL)
        student, teacher, target = outputs(batch=2)
        losses = [distiller(student, teacher, target) for _ in range(2)]
        results.append(([v.item() for step in losses for v in step.values()], distiller.memory.pixel_queue.clone()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_queues_are_checkpointed_buffers_and_round_trip():
    torch.manual_seed(12)
    distiller = CIRKD(STUDENT, TEACHER, **SMALL)
    distiller(*outputs(batch=2))
    state = distiller.state_dict()
    for name in ("memory.pixel_queue", "memory.pixel_queue_ptr", "memory.region_queue", "memory.region_queue_ptr"):
        assert name in state
    assert state["memory.pixel_queue"].shape == (19, 40, 32) and state["memory.region_queue"].shape == (19, 8, 32)
    assert state["memory.pixel_queue_ptr"].abs().sum() > 0
    torch.manual_seed(13)
    restored = CIRKD(STUDENT, TEACHER, **SMALL)
    assert not torch.equal(restored.memory.pixel_queue, distiller.memory.pixel_queue)
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_single_process_never_calls_torch_distributed(monkeypatch):
    assert not dist.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed called on a single process")

    for name in ("all_gather", "all_gather_into_tensor", "get_world_size", "get_rank", "broadcast", "all_reduce"):
        monkeypatch.setattr(dist, name, forbidden)
    distiller = CIRKD(STUDENT, TEACHER, **SMALL)
    assert len(distiller(*outputs(batch=2))) == 3


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="pixel_memory_size"):
        CIRKD(STUDENT, TEACHER, pixel_memory_size=0)
    with pytest.raises(ConfigError, match="pixels_per_image"):
        CIRKD(STUDENT, TEACHER, pixel_memory_size=8, pixels_per_image=16)
    with pytest.raises(ConfigError, match="feature"):
        CIRKD(STUDENT, TEACHER, feature="c5")


@pytest.mark.parametrize("config", ["cirkd.yaml", "cirkd_published.yaml"])
def test_method_configs_build(config):
    method = OmegaConf.to_container(load_config([f"method={Path(config).stem}"]).method, resolve=True)
    assert set(method["terms"]) == {"kd", "cirkd"}  # train_cirkd.py: no adversarial term
    assert method["terms"]["kd"] == {"weight": 1.0, "temperature": 1.0, "ignore_index": None}
    method["terms"]["cirkd"].update(SMALL)  # the released 20000 x 19 x 32 queue is fine but slow to fill in a test
    distiller = build(method, STUDENT, TEACHER)
    losses = distiller(*outputs(batch=2))
    assert set(losses) == {"kd", "cirkd_minibatch_pixel", "cirkd_memory_pixel", "cirkd_memory_region"}


# ---------------------------------------------------------------- DDP (2 processes, gloo) -----------------------------


def _run_steps(distiller: CIRKD, student: SegOutput, teacher: SegOutput, target: torch.Tensor) -> list[list[float]]:
    values = []
    for step in range(2):
        torch.manual_seed(100 + step)  # every rank (and the single process) draws the same random numbers
        values.append([v.item() for v in distiller(student, teacher, target).values()])
    return values


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        distiller = CIRKD(STUDENT, TEACHER, **SMALL).eval()  # eval: BN statistics do not depend on the local batch
        student, teacher, target = outputs(batch=4, seed=1)
        local = slice(2 * rank, 2 * rank + 2)
        local_student = SegOutput(student.logits[local], features={"decoder": student.features["decoder"][local]})
        local_teacher = SegOutput(teacher.logits[local], features={"decoder": teacher.features["decoder"][local]})
        losses = _run_steps(distiller, local_student, local_teacher, target[local])
        torch.save({"losses": losses, "memory": distiller.memory.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process_on_the_concatenated_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = CIRKD(STUDENT, TEACHER, **SMALL).eval()
    single_losses = _run_steps(single, *outputs(batch=4, seed=1))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank in ranks:  # the queues hold the gathered batch: identical on both ranks and equal to one process
        for key, value in single.memory.state_dict().items():
            assert torch.equal(rank["memory"][key], value), key
    # pairs never cross groups and the local batches hold equally many labelled pixels, so the mean over ranks
    # (what DDP's gradient averaging optimises) equals the single-process loss on the concatenated batch
    for step in range(2):
        mean_over_ranks = [(a + b) / 2 for a, b in zip(ranks[0]["losses"][step], ranks[1]["losses"][step], strict=True)]
        assert mean_over_ranks == pytest.approx(single_losses[step], rel=1e-5)


def test_last_write_per_slot_keeps_the_sequentially_last_write():
    winners = _last_write_per_slot(torch.tensor([5, 3, 5, 7, 3]))  # unique slots in sorted order: 3, 5, 7
    assert winners.tolist() == [4, 2, 3]
