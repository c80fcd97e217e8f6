"""The DALI loader: one ``@pipeline_def`` that decodes only the crop window (nvJPEG on GPU with
``device="mixed"``, the same graph with CPU operators and ``device_id=None`` elsewhere), resizes it
bicubically, optionally applies RandAugment (fine-tuning; DALI's ``auto_aug`` operations, see
:mod:`fastmae.data.randaug`), flips and normalises to CHW in the output dtype.

Samples enter through ``fn.external_source`` from :class:`~fastmae.data.index.ShardIndex` (the DALI
``wds2idx`` index gives every sample's byte range), rather than through ``fn.readers.webdataset``: the
reader shuffles only within a buffer over a contiguous slice of the data per rank and cannot restart
mid-epoch, while this feed gives a global shuffle, exact epochs over ranks, exact resume, labels parsed
in Python (any digit count) and the same samples, crop boxes and flips as the torch fallback loader.
"""

from __future__ import annotations

import dataclasses
import io
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .base import EpochLayout, ShardLoader, replacement
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .index import ShardError, ShardIndex
from .randaug import RandAugmentPolicy, dali_apply, dali_params, dali_suite
from .sampling import PAD_LABEL, image_size, sample_crop

_DALI_DTYPE = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16}


@pipeline_def(enable_conditionals=True)  # conditionals: RandAugment routes each sample to its op
def mae_pipeline(
    source: Any, img_size: int, decode_device: str, out_dtype: Any, interp: Any = types.INTERP_CUBIC,
    randaug: RandAugmentPolicy | None = None, suite: Any = None,
) -> tuple[Any, Any]:
    """Encoded JPEG + crop box + flip + label (+ RandAugment op, magnitude bin and sign per layer)
    -> normalised (3, S, S) image and int64 label."""
    if randaug is None:
        jpegs, anchors, shapes, flips, labels = fn.external_source(
            source=source, num_outputs=5, batch=True, cycle="raise", no_copy=False
        )
    else:
        jpegs, anchors, shapes, flips, labels, ra_ops, ra_bins, ra_signs = fn.external_source(
            source=source, num_outputs=8, batch=True, cycle="raise", no_copy=False
        )
    # decode only the window (x, y, w, h): cheaper than decoding the whole image and cropping
    images = fn.decoders.image_slice(
        jpegs, anchors, shapes, device=decode_device, output_type=types.RGB,
        normalized_anchor=False, normalized_shape=False, axis_names="WH",
    )
    images = fn.resize(images, size=[img_size, img_size], interp_type=interp, antialias=True)
    if randaug is not None:  # on the HWC uint8 crop, before flip and normalisation
        images = dali_apply(images, randaug, suite, ra_ops, ra_bins, ra_signs, img_size)
    images = fn.crop_mirror_normalize(
        images, mirror=flips, dtype=out_dtype, output_layout="CHW",
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
    )
    if decode_device == "mixed":
        labels = labels.gpu()
    return images, labels


_END = object()
# jpegs (list of uint8 arrays), anchors (B,2), shapes (B,2), flips (B,), labels (B,)
# [, RandAugment op index, magnitude bin, negate flag: (B, n) int32 each]
Batch = tuple[Any, ...]


class _Feed:
    """The ``external_source`` iterable: one epoch of this rank's batches from a start position; when it
    ends, the next ``iter`` (DALI prefetches it at once) starts the following epoch at batch 0.

    A background thread reads the bytes and computes the crops ``prefetch`` batches ahead, so the file
    reads (which release the GIL) overlap the training step instead of running inside ``next(loader)``.
    """

    def __init__(self, loader: DaliLoader, layout: EpochLayout, epoch: int, start: int, prefetch: int = 4) -> None:
        self._loader = weakref.ref(loader)  # no cycle: dropping the loader frees the pipeline at once
        self.next_pos = (layout, epoch, start)
        self.prefetch = prefetch
        # data.on_error=skip: (epoch, step) -> samples replaced in that batch, read by the loader with the batch
        self.bad: dict[tuple[int, int], list[str]] = {}
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

    def _put(self, q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
        while not stop.is_set() and self._loader() is not None:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, layout: EpochLayout, epoch: int, start: int, q: queue.Queue[Any],
                 stop: threading.Event) -> None:
        try:
            for batch in self._epoch(layout, epoch, start):
                if not self._put(q, batch, stop):
                    return
            # before _END: DALI calls iter() again right after StopIteration; the next epoch starts afresh
            self.next_pos = (dataclasses.replace(layout, start_sample=0), epoch + 1, 0)
            self._put(q, _END, stop)
        except BaseException as e:  # surfaced in the training process by __next__
            self._put(q, e, stop)

    def _epoch(self, layout: EpochLayout, epoch: int, start: int) -> Iterator[Batch]:
        ld = self._loader()
        if ld is None:
            return
        idx: ShardIndex = ld.index
        plan = layout.batches(epoch, start)
        img_size, scale = ld.img_size, ld.crop_scale
        randaug, num_ops, identity = ld._randaug, ld._num_ops, ld._identity
        skip, undecodable = ld.skip_bad, ld._undecodable
        del ld  # hold no strong reference: the thread must not keep the loader alive
        for b in plan:
            jpegs, boxes, labels, bad = [], [], [], []
            for j, i in enumerate(b.indices):
                i = int(i)
                try:
                    data, size, label = _read(idx, i, undecodable)
                except ShardError:
                    if not skip:
                        raise
                    if i not in undecodable:  # those were counted when DALI failed on them
                        bad.append(idx.name(i))
                    data, size, label = replacement(idx, i, lambda j: _read(idx, j, undecodable))
                u = None if b.uniforms is None else b.uniforms[j]
                boxes.append(sample_crop(u, *size, img_size, scale))
                jpegs.append(np.frombuffer(data, dtype=np.uint8))
                labels.append(PAD_LABEL if b.pad else label)
            if bad:
                self.bad[(epoch, b.step)] = bad
            box = np.asarray(boxes, dtype=np.float32)  # (B, 5): x, y, w, h, flip
            out = (jpegs, np.ascontiguousarray(box[:, 0:2]), np.ascontiguousarray(box[:, 2:4]),
                   box[:, 4].astype(np.int32), np.asarray(labels, dtype=np.int64))
            if randaug is not None:
                assert b.randaug is not None
                out += dali_params(randaug, b.randaug, num_ops, identity)
            yield out


def _read(idx: ShardIndex, i: int, undecodable: set[int]) -> tuple[bytes, tuple[int, int], int]:
    """(bytes, (width, height), label) of sample ``i``; :class:`ShardError` naming it when it cannot be used."""
    if i in undecodable:
        raise ShardError(f"{idx.shard(i)}: {idx.key(i)}: image does not decode")
    data = idx.read_image(i)
    try:
        size = image_size(data)
    except Exception as e:  # not a readable image header: name the sample, not the parser's error
        raise ShardError(f"{idx.shard(i)}: {idx.key(i)}: image header unreadable ({type(e).__name__}: {e}); "
                         "`python -m fastmae.data.shards verify` lists every damaged sample") from e
    return data, size, idx.read_label(i)


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

    def __init__(self, index: ShardIndex, **kwargs: Any) -> None:
        super().__init__(index, **kwargs)
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

    def _build(self, epoch: int, start: int) -> None:
        self._release()
        gpu = self._device_id is not None
        self._feed = _Feed(self, self.layout(), epoch, start)
        # DALI's auto_aug calls its own deprecated fn.experimental aliases, and DALI shows those warnings
        # whatever the filters say: record them and pass on every other warning
        with warnings.catch_warnings(record=True) as caught:
            self._pipe = mae_pipeline(
                source=self._feed, img_size=self.img_size,
                decode_device="mixed" if gpu else "cpu", out_dtype=_DALI_DTYPE[self.dtype],
                interp=types.INTERP_CUBIC if self.interpolation == "bicubic" else types.INTERP_LINEAR,
                randaug=self._randaug, suite=self._suite,
                batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=self._device_id,
                seed=self.seed + 1, prefetch_queue_depth=2, exec_dynamic=True,
            )
            self._pipe.build()
        for w in caught:
            if not (issubclass(w.category, DeprecationWarning) and "nvidia.dali.fn.experimental" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._iter = DALIGenericIterator(self._pipe, ["images", "labels"], auto_reset=False)
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
        self._pipe = None
        self._ready_for = None

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if start >= self.layout().steps():
            return
        if self._iter is None or self._ready_for != (epoch, self.start_sample, start):
            self._build(epoch, start)
        elif self._needs_reset:
            self._iter.reset()
            self._needs_reset = False
        self._ready_for = None  # until this epoch is consumed to its end, the pipeline's position is unknown
        assert self._iter is not None
        done = start
        while True:
            try:
                out = next(self._iter)
            except StopIteration:
                break
            except ShardError:  # raised by the feed (e.g. a bad label): already names the sample
                self._release()
                raise
            except RuntimeError as e:  # DALI stops on an undecodable image without naming it: name suspects
                if self.skip_bad and self._skip_undecodable(epoch, done):
                    self._build(epoch, done)  # the feed now replaces them; DALI starts again at this batch
                    continue
                self._release()
                raise ShardError(self._failure(epoch, done, e)) from e
            assert self._feed is not None
            bad = self._feed.bad.pop((epoch, done), None)
            if bad:
                try:
                    self.note_bad(bad)
                except ShardError:
                    self._release()
                    raise
            done += 1
            imgs, labels = out[0]["images"], out[0]["labels"]
            if imgs.dtype != self.dtype:
                imgs = imgs.to(self.dtype)
            yield imgs.to(self.device), labels.to(self.device).view(-1)
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
