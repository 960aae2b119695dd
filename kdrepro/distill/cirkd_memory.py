"""CIRKD's per-class memory of teacher embeddings (pixel queue and region queue), correct on one process and under DDP.

Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022, Sec. 3 (memory-based
pixel-to-pixel and pixel-to-region distillation). Released code: github.com/winycg/CIRKD, ``losses/cirkd_memory.py``
(``StudentSegContrast._dequeue_and_enqueue`` / ``_sample_negative``), defaults from ``train_cirkd.py``.

What the queues hold (as released):

* ``pixel_queue`` ``(K, P, D)``: for every class ``c``, the last ``P`` teacher pixel embeddings of class ``c``. From every
  image of the (gathered) batch, up to ``pixels_per_image`` (16) randomly chosen pixels of each present class are
  written contiguously at the class's pointer. If they do not fit before the end (``ptr + k >= P``) they are written
  to the *last* ``k`` slots and the pointer resets to 0 (the released wrap-around rule, kept exactly).
* ``region_queue`` ``(K, R, D)``: for every class, the last ``R`` region embeddings: the L2-normalised mean of the
  class's (L2-normalised) teacher pixel embeddings in one image; pointer ``(ptr + 1) mod R``.
* Both start as L2-normalised Gaussian noise, as released. They are **buffers**, so they are saved in checkpoints.

Memory (fp32, ``K × size × D × 4`` bytes) with the released sizes ``P = 20000``, ``R = 2000`` and ``D = 512`` (the
teacher's decoder channels): pixel queue 19·20000·512·4 B ≈ 0.78 GB and region queue ≈ 0.078 GB on Cityscapes;
6.1 GB and 0.61 GB on ADE20K (K = 150). The embedded profile (D = 128) needs 0.19 GB + 0.02 GB. Checkpoints grow by
the same amount. Both sizes are constructor options.

Deviations from the released code, each deliberate:

1. **Vectorised enqueue.** The release loops over images × present classes with a host sync per class. Here counts,
   region means, the random choice of pixels and the slot arithmetic are batched over all images and classes. The
   only Python loop left runs over the images of the gathered batch and does integer pointer arithmetic on ``(K,)``
   vectors (the wrap-around rule is a non-linear scan over images), plus a fixed 16-step loop of Floyd's sampling
   algorithm; no loop over classes. Slots written twice in one batch keep the later image's embedding, as the
   sequential release does.
2. **Pixels are sampled among the class's own pixels.** The release draws ``randperm(n_c)[:k]`` and indexes the whole
   image's pixel list with it, so "class-c" pixel entries are random pixels among the first ``n_c`` raster positions
   of the image, of any class (the same indexing slip as in the ContrastiveSeg code it derives from). The paper
   describes class-wise pixel queues; we sample among class-``c`` pixels. ``released_pixel_sampling=True`` reproduces
   the release's behaviour (used by ``cirkd_published.yaml``).
3. **One process or DDP.** The release calls ``all_gather`` unconditionally (one-GPU runs crash: CIRKD issues #18,
   #30). Here teacher embeddings and labels are gathered only when ``torch.distributed`` is initialised with world size
   > 1 (all ranks must pass equally shaped tensors, e.g. ``drop_last=True``); one process enqueues its own batch.
   Every rank then performs the same enqueue on the same gathered batch. The random choices use torch's global RNG,
   so ranks seeded alike keep identical queues, equal to a single process enqueueing the concatenated batch; ranks
   seeded differently keep different (equally valid) samples of the same embeddings.
4. Labels outside ``[0, K)`` that are not the ignore index are treated as ignored rather than raising an index error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_without_replacement(counts: Tensor, max_samples: int) -> Tensor:
    """For every row ``r``, ``min(counts[r], max_samples)`` distinct uniform draws from ``range(counts[r])``.

    Floyd's algorithm, vectorised over rows: ``max_samples`` steps whatever the number of rows. Returns ``(R,
    max_samples)`` int64 with ``-1`` in unused columns. Uses torch's global RNG (``torch.rand``).
    """
    rows = counts.numel()
    taken = counts.clamp(max=max_samples)
    chosen = torch.full((rows, max_samples), -1, dtype=torch.long, device=counts.device)
    for step in range(max_samples):
        active = step < taken
        upper = counts - taken + step  # Floyd: j runs over n-k .. n-1; draw t uniformly from [0, j]
        draw = torch.minimum((torch.rand(rows, device=counts.device) * (upper + 1)).long(), upper)
        seen = (chosen[:, :step] == draw[:, None]).any(dim=1)
        chosen[:, step] = torch.where(active, torch.where(seen, upper, draw), torch.full_like(draw, -1))
    return chosen


class ClassEmbeddingQueues(nn.Module):
    """Per-class FIFO queues of teacher pixel and region embeddings (CIRKD ``StudentSegContrast`` memory).

    Args:
        num_classes: ``K``.
        dim: embedding size ``D`` (the teacher's decoder channels).
        pixel_memory_size: ``P`` pixel embeddings kept per class (released ``--pixel-memory-size 20000``).
        region_memory_size: ``R`` region embeddings kept per class (released ``--region-memory-size 2000``).
        pixels_per_image: pixels of each present class enqueued per image (released ``pixel_update_freq = 16``).
        ignore_index: label of unlabelled pixels.
        released_pixel_sampling: reproduce the release's pixel choice (deviation 2 in the module docstring).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixels_per_image: int = 16,
        ignore_index: int = 255,
        released_pixel_sampling: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.pixel_memory_size = pixel_memory_size
        self.region_memory_size = region_memory_size
        self.pixels_per_image = pixels_per_image
        self.ignore_index = ignore_index
        self.released_pixel_sampling = released_pixel_sampling
        self.register_buffer("pixel_queue", _normalized_noise(num_classes, pixel_memory_size, dim))
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("region_queue", _normalized_noise(num_classes, region_memory_size, dim))
        self.register_buffer("region_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add one batch: ``embeddings`` ``(B, D, h, w)`` L2-normalised teacher features, ``labels`` ``(B, h, w)``.

        Pass the *gathered* batch under DDP (see :func:`kdrepro.distributed.gather_from_all_ranks`). Runs in fp32 outside autocast.
        """
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            pixels = embeddings.flatten(2).transpose(1, 2).to(self.pixel_queue.dtype)  # (B, N, D)
            labels = labels.flatten(1)
            valid = (labels != self.ignore_index) & (labels >= 0) & (labels < self.num_classes)
            class_of_pixel = torch.where(valid, labels, torch.full_like(labels, self.num_classes))  # K = "no class"
            one_hot = F.one_hot(class_of_pixel, self.num_classes + 1)[..., : self.num_classes].to(pixels.dtype)
            counts = one_hot.sum(dim=1).long()  # (B, K)
            sums = torch.bmm(one_hot.transpose(1, 2), pixels)  # (B, K, D), deterministic (no atomics)
            self._enqueue_regions(F.normalize(sums / counts.clamp(min=1)[..., None], dim=2), counts)
            self._enqueue_pixels(pixels, class_of_pixel, counts)

    def _enqueue_regions(self, regions: Tensor, counts: Tensor) -> None:
        """One region embedding per (image, present class), written at ``ptr``; ``ptr += 1 mod R`` each time."""
        size = self.region_memory_size
        present = counts > 0
        rank = present.long().cumsum(dim=0) - 1  # order of the image among those holding the class
        total = present.long().sum(dim=0)
        keep = present & (rank >= total - size)  # more than R in one batch: only the last R survive, as sequentially
        image_index, class_index = keep.nonzero(as_tuple=True)
        slot = (self.region_queue_ptr[class_index] + rank[image_index, class_index]) % size
        self.region_queue[class_index, slot] = regions[image_index, class_index]
        self.region_queue_ptr.copy_((self.region_queue_ptr + total) % size)

    def _enqueue_pixels(self, pixels: Tensor, class_of_pixel: Tensor, counts: Tensor) -> None:
        """Up to ``pixels_per_image`` random pixels per (image, present class), with the released wrap-around rule."""
        batch, num_pixels, _ = pixels.shape
        classes, size = self.num_classes, self.pixel_memory_size
        taken = counts.clamp(max=self.pixels_per_image)  # (B, K)
        starts = torch.empty_like(taken)
        pointer = self.pixel_queue_ptr.clone()
        for image in range(batch):  # non-linear scan over images; vectorised over classes
            wraps = pointer + taken[image] >= size
            starts[image] = torch.where(wraps, size - taken[image], pointer)
            pointer = torch.where(wraps, torch.zeros_like(pointer), pointer + taken[image])
        ranks = sample_without_replacement(counts.flatten(), self.pixels_per_image).view(batch, classes, -1)
        if self.released_pixel_sampling:
            positions = ranks  # the release's indexing: the first n_c raster positions of the image, any class
        else:
            grouped = torch.sort(class_of_pixel, dim=1, stable=True).indices  # pixels ordered by class
            offsets = counts.cumsum(dim=1) - counts  # where each class's block starts in ``grouped``
            within = (offsets[..., None] + ranks.clamp(min=0)).clamp(max=num_pixels - 1).view(batch, -1)
            positions = torch.where(ranks >= 0, grouped.gather(1, within).view_as(ranks), ranks)
        image_index, class_index, column = (positions >= 0).nonzero(as_tuple=True)  # image-major = release's order
        slot = starts[image_index, class_index] + column
        winners = _last_write_per_slot(class_index * size + slot)
        image_index, class_index, slot = image_index[winners], class_index[winners], slot[winners]
        position = positions[image_index, class_index, column[winners]]
        self.pixel_queue[class_index, slot] = pixels[image_index, position]
        self.pixel_queue_ptr.copy_(pointer)

    def sample(self, queue: Tensor, per_class: int) -> Tensor:
        """``per_class`` entries of every class at the same random queue positions (released ``_sample_negative``).

        Returns ``(K · per_class, D)``, class-major. One ``torch.randperm`` of the queue length (global RNG).
        """
        classes, size, dim = queue.shape
        index = torch.randperm(size, device=queue.device)[: min(per_class, size)]
        return queue[:, index].reshape(-1, dim)


def _normalized_noise(*shape: int) -> Tensor:
    """``F.normalize(torch.randn(*shape), dim=-1)`` computed in place: the same values without a second copy of the
    queue (ADE20K's pixel queue alone is 6.1 GB; out of place, building it peaked at twice that)."""
    noise = torch.randn(*shape)
    return noise.div_(noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _last_write_per_slot(linear_slot: Tensor) -> Tensor:
    """Indices of the writes that a sequential loop would leave in place: the last write to every distinct slot."""
    unique_slots, inverse = torch.unique(linear_slot, return_inverse=True)
    order = torch.arange(linear_slot.numel(), device=linear_slot.device)
    last = torch.full((unique_slots.numel(),), -1, dtype=torch.long, device=linear_slot.device)
    return last.scatter_reduce_(0, inverse, order, reduce="amax")


__all__ = ["ClassEmbeddingQueues", "sample_without_replacement"]
