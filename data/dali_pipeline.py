"""The DALI loader: one ``@pipeline_def`` that decodes only the crop window (nvJPEG on the GPU, the same graph
with CPU operators elsewhere), resizes it bicubically, optionally applies RandAugment and flips, fed with samples
and crop boxes from the shard index through ``fn.external_source``; colour jitter (when on) and normalisation
follow in torch on the device, the same code as the torch loader's (:meth:`ShardLoader.finish`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .base import BatchPlan, EpochLayout, ShardLoader, replacement
from .index import ShardError, ShardIndex
from .randaug import RandAugmentPolicy, dali_apply, dali_params, dali_suite
from .sampling import PAD_LABEL, CropSpec, image_size, sample_crop

# batches DALI prepares ahead (its prefetch_queue_depth), and nvJPEG's device_memory_padding default
PIPELINE_DEPTH = 2
NVJPEG_DEVICE_PADDING = 16 << 20


@pipeline_def(enable_conditionals=True)  # conditionals: RandAugment routes each sample to its op
def mae_pipeline(
    source: Any, img_size: int, decode_device: str, interp: Any = types.INTERP_CUBIC,
    randaug: RandAugmentPolicy | None = None, suite: Any = None, parallel: bool = False,
    source_prefetch: int = 2, decoder: dict[str, Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Encoded JPEG + crop box + flip + label + replaced flag (+ RandAugment op, magnitude bin and sign per
    layer) -> (3, S, S) uint8 image (normalised into the training dtype by torch on the same device: one
    rounding, a quarter of float32's bytes out of DALI), int64 label and the flag. ``parallel``: ``source`` is
    a :class:`_BatchSource` run by the pipeline's Python worker processes, ``source_prefetch`` batches ahead.
    ``decoder``: extra arguments of the ``mixed`` (nvJPEG) decoder."""
    outputs = 6 if randaug is None else 9
    if parallel:
        cols = fn.external_source(source=source, num_outputs=outputs, batch=True, batch_info=True, parallel=True,
                                  prefetch_queue_depth=source_prefetch)
    else:
        cols = fn.external_source(source=source, num_outputs=outputs, batch=True, cycle="raise", no_copy=False)
    jpegs, anchors, shapes, flips, labels, replaced = cols[:6]
    # decode only the window (x, y, w, h): cheaper than decoding the whole image and cropping
    images = fn.decoders.image_slice(
        jpegs, anchors, shapes, device=decode_device, output_type=types.RGB,
        normalized_anchor=False, normalized_shape=False, axis_names="WH", **(decoder or {}),
    )
    images = fn.resize(images, size=[img_size, img_size], interp_type=interp, antialias=True)
    if randaug is not None:  # on the HWC uint8 crop, before flip and normalisation
        images = dali_apply(images, randaug, suite, *cols[6:], img_size)
    images = fn.crop_mirror_normalize(images, mirror=flips, dtype=types.UINT8, output_layout="CHW")
    if decode_device == "mixed":
        labels = labels.gpu()
    return images, labels, replaced


# data.feed_workers=-1 on a GPU
AUTO_FEED_WORKERS = 2
_END = object()
# jpegs (list of uint8 arrays), anchors (B,2), shapes (B,2), flips (B,), labels (B,), replaced (B,) int32
# [, RandAugment op index, magnitude bin, negate flag: (B, n) int32 each]
Batch = tuple[Any, ...]


@dataclasses.dataclass
class _FeedSpec:
    """What turning a batch plan into a DALI input batch needs (no loader reference; picklable for the
    worker processes)."""

    index: ShardIndex
    crop: CropSpec
    randaug: RandAugmentPolicy | None
    num_ops: int
    identity: int
    skip: bool
    undecodable: frozenset[int]

    def batch(self, b: BatchPlan) -> Batch:
        """Read ``b``'s samples and draw their crops; with data.on_error=skip a sample that cannot be used is
        replaced by :func:`~fastmae.data.base.replacement` and flagged (1 = count it; those DALI already failed
        on were counted then)."""
        idx, undecodable = self.index, self.undecodable
        jpegs, boxes, labels, replaced = [], [], [], []
        for j, i in enumerate(b.indices):
            i = int(i)
            flag = 0
            try:
                data, size, label = _read(idx, i, undecodable)
            except ShardError:
                if not self.skip:
                    raise
                flag = int(i not in undecodable)
                data, size, label = replacement(idx, i, lambda k: _read(idx, k, undecodable))
            u = None if b.uniforms is None else b.uniforms[j]
            boxes.append(sample_crop(u, *size, self.crop))
            jpegs.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(PAD_LABEL if b.pad else label)
            replaced.append(flag)
        box = np.asarray(boxes, dtype=np.float32)  # (B, 5): x, y, w, h, flip
        out = (jpegs, np.ascontiguousarray(box[:, 0:2]), np.ascontiguousarray(box[:, 2:4]),
               box[:, 4].astype(np.int32), np.asarray(labels, dtype=np.int64), np.asarray(replaced, dtype=np.int32))
        if self.randaug is not None:
            assert b.randaug is not None
            out += dali_params(self.randaug, b.randaug, self.num_ops, self.identity)
        return out


def _next_epoch(layout: EpochLayout) -> EpochLayout:
    """The layout of the epoch after ``layout``'s: from its first sample, in this loader's own order."""
    return dataclasses.replace(layout, start_sample=0, order_layout=None)


class _BatchSource:
    """The parallel ``external_source`` callback (``data.feed_workers`` > 0): DALI's worker processes call it
    with the batch's position (epoch since the build, iteration in it) and it returns that batch, a pure
    function of the position, so no per-sample Python runs in the training process."""

    def __init__(self, spec: _FeedSpec, layout: EpochLayout, epoch: int, start: int) -> None:
        self.spec, self.layout, self.epoch, self.start = spec, layout, epoch, start

    def __call__(self, info: Any) -> Batch:
        later = info.epoch_idx > 0
        layout = _next_epoch(self.layout) if later else self.layout
        step = (0 if later else self.start) + info.iteration
        if step >= layout.steps():
            raise StopIteration
        try:
            return self.spec.batch(layout.batch(self.epoch + info.epoch_idx, step))
        except ShardError as e:  # DALI passes a worker's exception on as RuntimeError(str(e)): keep it findable
            raise RuntimeError(_SHARD_ERROR + str(e)) from None


class _Feed:
    """The ``external_source`` iterable of the threaded feed (``data.feed_workers=0``): one epoch of this
    rank's batches from a start position; when it ends, the next ``iter`` (DALI prefetches it at once)
    starts the following epoch at batch 0.

    A background thread reads the bytes and computes the crops ``prefetch`` batches ahead, so the file
    reads (which release the GIL) overlap the training step instead of running inside ``next(loader)``.
    """

    def __init__(self, spec: _FeedSpec, layout: EpochLayout, epoch: int, start: int, prefetch: int = 4) -> None:
        self.spec = spec
        self.next_pos = (layout, epoch, start)
        self.prefetch = prefetch
        self._queue: queue.Queue[Any] | None = None
        self._stop: threading.Event | None = None

    def __iter__(self) -> _Feed:
        self.stop()
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        threading.Thread(
            target=self._produce, args=(*self.next_pos, q, stop), name="fastmae-dali-feed", daemon=True
        ).start()
        self._queue, self._stop = q, stop
        return self

    def __next__(self) -> Batch:
        assert self._queue is not None
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """End the producer thread of the current epoch (if any)."""
        if self._stop is not None:
            self._stop.set()
        self._queue = self._stop = None

    @staticmethod
    def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, layout: EpochLayout, epoch: int, start: int, q: queue.Queue[Any],
                 stop: threading.Event) -> None:
        try:
            for b in layout.batches(epoch, start):
                if not self._put(q, self.spec.batch(b), stop):
                    return
            # before _END: DALI calls iter() again right after StopIteration; the next epoch starts afresh
            self.next_pos = (_next_epoch(layout), epoch + 1, 0)
            self._put(q, _END, stop)
        except BaseException as e:  # surfaced in the training process by __next__
            self._put(q, e, stop)


def dali_gpu_bytes(batch: int, img_size: int, threads: int, decoder: dict[str, Any]) -> int:
    """Analytic estimate of the DALI pipeline's GPU memory, bytes: the uint8 output of the batches in flight
    (DALI's queue of ``PIPELINE_DEPTH`` + the one in use); per queued batch the decoded crop windows (on average
    0.6 of an image under RandomResizedCrop(0.2-1); an image of the pre-allocation hint, else 500 x 375) and the
    resized crops; nvJPEG's device padding per decoder thread; with a hint, the hardware decoder's pre-allocated
    buffers for its share of the batch. Not yet checked against a measurement."""
    out = 3 * img_size**2
    w = decoder.get("preallocate_width_hint", 500)
    h = decoder.get("preallocate_height_hint", 375)
    total = (PIPELINE_DEPTH + 1) * batch * out + PIPELINE_DEPTH * batch * (3 * w * h * 3 // 5 + out)
    total += NVJPEG_DEVICE_PADDING * max(1, threads)
    if "preallocate_width_hint" in decoder:
        total += int(batch * decoder["hw_decoder_load"] * 3 * w * h)
    return total


def _start_method() -> str:
    """How DALI starts the feed's worker processes: ``spawn`` (a fresh interpreter: safe whatever threads or
    CUDA context the training process has; ~1-2 s per pipeline build), or ``fork`` when
    ``FASTMAE_DALI_START_METHOD=fork`` (cheap, but only safe before CUDA and other threads start)."""
    method = os.environ.get("FASTMAE_DALI_START_METHOD", "spawn")
    if method not in ("fork", "spawn"):
        raise ValueError(f"FASTMAE_DALI_START_METHOD={method!r}: use fork or spawn")
    return method


_SHARD_ERROR = "fastmae ShardError: "


def _shard_error(e: BaseException | None) -> ShardError | None:
    """The :class:`ShardError` behind ``e``, if any: raised by the feed thread, or by a feed worker process
    (DALI re-raises that as an exception caused by ``RuntimeError(str(error))``)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ShardError):
            return e
        text = str(e)
        if text.startswith(_SHARD_ERROR):
            return ShardError(text[len(_SHARD_ERROR):])
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _read(idx: ShardIndex, i: int, undecodable: set[int]) -> tuple[bytes, tuple[int, int], int]:
    """(bytes, (width, height), label) of sample ``i``; :class:`ShardError` naming it when it cannot be used."""
    if i in undecodable:
        raise ShardError(f"{idx.shard(i)}: {idx.key(i)}: image does not decode")
    data, label = idx.read_sample(i)
    try:
        size = image_size(data)
    except Exception as e:  # not a readable image header: name the sample, not the parser's error
        raise ShardError(f"{idx.shard(i)}: {idx.key(i)}: image header unreadable ({type(e).__name__}: {e}); "
                         "`python -m fastmae.data.shards verify` lists every damaged sample") from e
    return data, size, label


def _decodes(idx: ShardIndex, i: int) -> bool:
    """Whether sample ``i``'s image decodes (PIL, on the CPU)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(idx.read_image(i))) as im:
            im.load()
        return True
    except Exception:
        return False


class DaliLoader(ShardLoader):
    """DALI decoding on the training device (GPU) or its CPU twin; see the module docstring."""

    backend = "dali"

    def __init__(self, index: ShardIndex, cfg: Any, **kwargs: Any) -> None:
        super().__init__(index, cfg, **kwargs)
        feed_workers, hw_decoder_load = cfg.feed_workers, cfg.hw_decoder_load
        preallocate_hint = (cfg.preallocate_width_hint, cfg.preallocate_height_hint)
        # the nvJPEG ("mixed") decoder: the share of images for the hardware JPEG decoder (A100/H100), the rest
        # on data.num_workers CPU threads (Huffman) + CUDA; the largest image (width, height) to pre-allocate
        # the hardware decoder's buffers for (0 = grow as needed)
        self.decoder: dict[str, Any] = {"hw_decoder_load": float(hw_decoder_load)}
        if preallocate_hint[0] and preallocate_hint[1]:
            self.decoder.update(preallocate_width_hint=int(preallocate_hint[0]),
                                preallocate_height_hint=int(preallocate_hint[1]))
        # worker processes that read the samples and draw the crops (DALI's parallel external source); 0: a
        # thread of the training process does it; -1: workers on a GPU, the thread on the CPU twin
        self.feed_workers = int(feed_workers) if feed_workers >= 0 else (AUTO_FEED_WORKERS if
                                                                         self.device.type == "cuda" else 0)
        self._iter: DALIGenericIterator | None = None
        self._pipe: Any = None
        self._feed: _Feed | None = None
        # position (epoch, start sample of its layout, batch) the built pipeline will produce next
        self._ready_for: tuple[int, int, int] | None = None
        self._needs_reset = False
        # RandAugment: DALI's operation suite; the feed draws each sample's op, magnitude and sign
        self._randaug = self.randaug if self.randaug is not None and self.randaug.n > 0 else None
        # data.on_error=skip: samples DALI could not decode (found when a batch failed), replaced from then on
        self._undecodable: set[int] = set()
        self._suite: list[Any] | None = None
        self._num_ops = self._identity = 0
        if self._randaug is not None:
            self._suite = dali_suite(self._randaug)
            names = [a.name for a in self._suite]
            self._num_ops, self._identity = len(names), names.index("identity")
        gpu = self.device.type == "cuda"
        if gpu:
            self._device_id: int | None = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        else:
            self._device_id = None

    def _how(self) -> list[str]:
        return [*super()._how(), f"{self.feed_workers} feed processes" if self.feed_workers else "feed thread"]

    def gpu_memory_bytes(self) -> int:
        """DALI's GPU memory on this rank (0 on the CPU twin): :func:`dali_gpu_bytes`."""
        if self._device_id is None:
            return 0
        return dali_gpu_bytes(self.batch_size, self.img_size, self.num_workers, self.decoder)

    @property
    def prefetch_batches(self) -> int:  # type: ignore[override]
        # the feed's batches in flight (the thread's queue, or each worker's) + DALI's own queue + one
        return (self.feed_workers + 1 if self.feed_workers else 4) + 3

    def _build(self, epoch: int, start: int) -> None:
        self._release()
        gpu = self._device_id is not None
        spec = _FeedSpec(self.index, self.crop_spec, self._randaug, self._num_ops, self._identity,
                         self.skip_bad, frozenset(self._undecodable))
        source: Any
        if self.feed_workers:
            source = _BatchSource(spec, self.layout(), epoch, start)
        else:
            source = self._feed = _Feed(spec, self.layout(), epoch, start)
        parallel = dict(py_num_workers=self.feed_workers, py_start_method=_start_method()) if self.feed_workers else {}
        # DALI's auto_aug calls its own deprecated fn.experimental aliases, and DALI shows those warnings
        # whatever the filters say: record them and pass on every other warning
        with warnings.catch_warnings(record=True) as caught:
            self._pipe = mae_pipeline(
                source=source, parallel=bool(self.feed_workers), source_prefetch=self.feed_workers + 1,
                img_size=self.img_size, decoder=self.decoder if gpu else None,
                decode_device="mixed" if gpu else "cpu",
                interp=types.INTERP_CUBIC if self.interpolation == "bicubic" else types.INTERP_LINEAR,
                randaug=self._randaug, suite=self._suite,
                batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=self._device_id,
                seed=self.seed + 1, prefetch_queue_depth=PIPELINE_DEPTH, exec_dynamic=True, **parallel,
            )
            self._pipe.build()
        for w in caught:
            if not (issubclass(w.category, DeprecationWarning) and "nvidia.dali.fn.experimental" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels", "replaced"], auto_reset=False)
        self._needs_reset = False

    def close(self) -> None:
        """Release the pipeline and stop its feed thread and the spool of streamed shards."""
        self._release()
        super().close()

    def _release(self) -> None:
        """Release the pipeline (its threads and buffers) and stop its feed thread."""
        if self._feed is not None:
            self._feed.stop()
        self._feed = None
        self._iter = None
        pool = getattr(self._pipe, "_py_pool", None)
        if pool is not None:  # the feed's worker processes
            pool.close()
        self._pipe = None
        self._ready_for = None

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= self.layout().steps():
            return
        build = self._iter is None or self._ready_for != (epoch, self.start_sample, start)
        if not build and self._needs_reset:
            assert self._iter is not None
            self._iter.reset()
            self._needs_reset = False
        self._ready_for = None  # until this epoch is consumed to its end, the pipeline's position is unknown
        done = start
        while True:
            try:
                if build:  # DALI runs the first batches while the iterator is made: errors surface here too
                    build = False
                    self._build(epoch, done)
                assert self._iter is not None
                out = next(self._iter)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - sorted below
                named = _shard_error(e)
                if named is not None:  # raised by the feed (e.g. a bad label): it names the sample
                    self._release()
                    raise named from None
                if not isinstance(e, RuntimeError):
                    self._release()
                    raise
                # DALI stops on an undecodable image without naming it: name the suspects
                if self.skip_bad and self._skip_undecodable(epoch, done):
                    build = True  # the feed now replaces them; DALI starts again at this batch
                    continue
                self._release()
                raise ShardError(self._failure(epoch, done, e)) from e
            flags = out[0]["replaced"]
            if bool(flags.any()):  # samples the feed replaced (data.on_error=skip): count them
                plan = self.layout().batch(epoch, done)
                try:
                    self.note_bad([self.index.name(int(i)) for i, f in zip(plan.indices, flags.tolist(), strict=True)
                                   if f])
                except ShardError:
                    self._release()
                    raise
            imgs, labels = out[0]["images"], out[0]["labels"]
            yield self.finish(imgs.to(self.device), epoch, done), labels.to(self.device).view(-1)
            done += 1
        self._needs_reset = True
        self._ready_for = (epoch + 1, 0, 0)

    def _suspects(self, epoch: int, step: int) -> list[int]:
        """Samples of the batch at ``step`` and of those prefetched after it (DALI names none of them)."""
        out: list[int] = []
        for b in self.layout().batches(epoch, step):
            if b.step >= step + 3:
                break
            out += [int(i) for i in b.indices]
        return out

    def _skip_undecodable(self, epoch: int, step: int) -> bool:
        """data.on_error=skip after DALI failed at ``step``: find the suspects that do not decode, count them
        and have the feed replace them; False when none of them is to blame."""
        new = [i for i in self._suspects(epoch, step) if i not in self._undecodable and not _decodes(self.index, i)]
        if not new:
            return False
        self._undecodable.update(new)
        try:
            self.note_bad([self.index.name(i) for i in new])
        except ShardError:
            self._release()
            raise
        return True

    def _failure(self, epoch: int, step: int, err: BaseException) -> str:
        """An error message naming the samples of the batches DALI may have been working on."""
        suspects = [f"{os.path.basename(str(self.index.shard(i)))}:{self.index.key(i)}"
                    for i in self._suspects(epoch, step)]
        shown = ", ".join(suspects[:12]) + (f", ... ({len(suspects)} in all)" if len(suspects) > 12 else "")
        first = str(err).strip().splitlines()
        return (f"DALI failed in epoch {epoch} at batch {step} on rank {self.rank}, most likely on an image "
                f"that does not decode, one of: {shown}. Check the shards with `python -m fastmae.data.shards "
                f"verify {os.path.dirname(str(self.index.shards[0]))}`. DALI said: {' '.join(first[-4:])}")

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass
