"""Resumable, crash-safe output files for `esm2 embed`: HDF5, .npz or .safetensors.

Work goes into `<output>.partial.h5` (HDF5): one group per finished sequence, marked
complete and flushed before the next one starts, so a killed run loses at most the
sequence being written. The output itself is only ever replaced whole, by an atomic
rename of a finished file, when the run ends or is interrupted; it is never half
written, and holds only sequences marked complete (a group that an interruption cut
short is dropped first), so that a re-run can trust every sequence it finds. A re-run
reopens the work file (or, when that is missing or damaged, starts from the output)
and skips the sequences it holds.

Keys (HDF5 paths, npz names, safetensors names): `<id>/<output>/<layer>` for mean,
bos and per_token, `<id>/<output>` for contacts, attentions and logits. `%` and `/` in
ids are written `%25` and `%2F`; HDF5 groups also carry the id as attribute `id`.

Every file says where its outputs came from: the model, its weights fingerprint, whether the
weights are random, the precision and the server's version (HDF5 attributes, and the
`__esm2_provenance__` npz member or safetensors metadata). A run that would add outputs of
other weights (another fingerprint) to a file is refused.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import safetensors.numpy

from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind

log = logging.getLogger(__name__)

FORMATS = {".h5": "hdf5", ".hdf5": "hdf5", ".npz": "npz", ".safetensors": "safetensors"}
SETTINGS_KEY = "__esm2_settings__"  # npz member / safetensors metadata holding the run's settings
# npz member / safetensors metadata / HDF5 attribute: where the outputs came from, as JSON
# (esm2_wire.provenance); HDF5 files also carry each of its fields as an attribute of its own.
PROVENANCE_KEY = "__esm2_provenance__"


class OutputError(Exception):
    """An output file that cannot be used for this run."""


def output_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise OutputError(
            f"{path}: unknown output type {path.suffix!r}; use .h5, .hdf5, .npz or .safetensors"
        ) from None


def escape_id(seq_id: str) -> str:
    escaped = seq_id.replace("%", "%25").replace("/", "%2F")
    return escaped.replace(".", "%2E") if escaped in (".", "..") else escaped


# Key order within a sequence: per-layer outputs first.
_FILE_ORDER = (
    OutputKind.MEAN, OutputKind.BOS, OutputKind.PER_TOKEN, OutputKind.CONTACTS, OutputKind.ATTENTIONS,
    OutputKind.LOGITS,
)


def output_arrays(outputs: ItemResult, kinds) -> dict[str, np.ndarray]:
    """`<output>/<layer>` or `<output>` -> array, for the output kinds asked for."""
    arrays = {}
    for kind in _FILE_ORDER:
        if kind not in kinds:
            continue
        if kind.per_layer:
            arrays.update({f"{kind.value}/{layer}": array for layer, array in outputs.get(kind).items()})
        else:
            arrays[kind.value] = outputs.get(kind)
    return arrays


class EmbeddingStore:
    def __init__(self, path: Path, settings: dict, provenance: dict):
        self.path = path
        self.format = output_format(path)
        self.work_path = path.with_name(path.name + ".partial.h5")
        self.settings = json.dumps(settings, sort_keys=True)
        self.provenance = provenance  # Provenance.as_dict() of the model serving this run
        self._file: h5py.File | None = None

    # ---- opening ----------------------------------------------------------------
    def open(self) -> set[str]:
        """Open the work file and return the ids already written."""
        self._file = self._reopen_work()
        imported = self._file is None
        if imported:
            self._file = self._start_work()
        found = self._file.attrs.get(SETTINGS_KEY)
        if found != self.settings:
            self._file.close()
            self._file = None
            if imported:  # a copy of the output: drop it, so that deleting the output starts over
                self.work_path.unlink()
            stale = self.path if imported else self.work_path
            raise OutputError(
                f"{stale} was written with other settings ({found}); this run asks for {self.settings}. "
                f"Use another output file, or delete {stale} to start over"
            )
        self._check_provenance(imported)
        self._drop_incomplete()
        return {group.attrs["id"] for group in self._file.values()}

    def _check_provenance(self, imported: bool) -> None:
        """Refuse to add outputs of other weights to what the file holds."""
        found = _loads(self._file.attrs.get(PROVENANCE_KEY))
        if not found and not len(self._file):  # nothing written yet: this run's weights are the file's
            found = self.provenance
            _stamp(self._file, self.provenance)
        if found.get("weights_fingerprint") == self.provenance["weights_fingerprint"]:
            return
        self._file.close()
        self._file = None
        if imported:
            self.work_path.unlink()
        stale = self.path if imported else self.work_path
        was = (f"weights {found['weights_fingerprint']} ({found.get('model')}"
               f"{', random weights' if found.get('random_weights') else ''})" if found.get("weights_fingerprint")
               else "no weights fingerprint (written before esm2 recorded one, or by another tool)")
        now = self.provenance
        raise OutputError(
            f"{stale} holds outputs of {was}; the server now serves {now['model']} with weights "
            f"{now['weights_fingerprint']}{' (random weights)' if now['random_weights'] else ''}. Adding to it would "
            f"mix outputs of different weights: use another output file, or delete {stale} to start over"
        )

    def _drop_incomplete(self) -> None:
        """Delete groups without the `complete` mark: sequences being written when a run stopped."""
        for name, group in list(self._file.items()):
            if not group.attrs.get("complete"):
                del self._file[name]
        self._file.flush()

    def _reopen_work(self) -> h5py.File | None:
        if not self.work_path.exists():
            return None
        try:
            return h5py.File(self.work_path, "a")
        except OSError as exc:
            log.warning("%s is damaged (%s); starting again from %s", self.work_path, exc, self.path)
            self.work_path.unlink()
            return None

    def _start_work(self) -> h5py.File:
        tmp = self.work_path.with_name(self.work_path.name + ".tmp")
        with h5py.File(tmp, "w") as work:
            if self.path.exists():
                self._import(work)
            else:
                work.attrs[SETTINGS_KEY] = self.settings
                _stamp(work, self.provenance)
        os.replace(tmp, self.work_path)
        return h5py.File(self.work_path, "a")

    def _import(self, work: h5py.File) -> None:
        """Copy a finished output into a fresh work file."""
        try:
            if self.format == "hdf5":
                with h5py.File(self.path, "r") as source:
                    for key, value in source.attrs.items():
                        work.attrs[key] = value
                    for name, group in source.items():
                        if group.attrs.get("complete"):
                            source.copy(group, work, name)
                return
            if self.format == "npz":
                with np.load(self.path, allow_pickle=False) as source:
                    arrays = {key: source[key] for key in source.files}
                settings = str(arrays.pop(SETTINGS_KEY, ""))
                provenance = str(arrays.pop(PROVENANCE_KEY, ""))
            else:
                arrays = safetensors.numpy.load_file(self.path)
                with safetensors.safe_open(self.path, framework="numpy") as source:
                    metadata = source.metadata() or {}
                settings, provenance = metadata.get(SETTINGS_KEY, ""), metadata.get(PROVENANCE_KEY, "")
        except (OSError, ValueError, zipfile.BadZipFile, safetensors.SafetensorError) as exc:
            raise OutputError(
                f"{self.path} exists but cannot be read ({exc}); move it away or choose another -o"
            ) from None
        work.attrs[SETTINGS_KEY] = settings
        if provenance:
            _stamp(work, _loads(provenance))
        for key, array in arrays.items():
            name, _, dataset = key.partition("/")
            group = work.require_group(name)
            group.attrs["id"] = unquote(name)
            group.attrs["complete"] = True
            group.create_dataset(dataset, data=array)

    # ---- writing ----------------------------------------------------------------
    def add(self, seq_id: str, arrays: dict[str, np.ndarray]) -> None:
        name = escape_id(seq_id)
        try:
            group = self._file.create_group(name)
            group.attrs["id"] = seq_id
            for key, array in arrays.items():
                group.create_dataset(key, data=array)
            group.attrs["complete"] = True
        except BaseException:  # interrupted (Ctrl-C) or failed: leave no half-written sequence
            if name in self._file:
                del self._file[name]
            raise
        self._file.flush()

    def publish(self) -> None:
        """Replace the output with every complete sequence written so far, atomically."""
        self._drop_incomplete()  # in case an interruption also cut `add`'s own clean-up short
        self._file.close()
        self._file = None
        if self.format == "hdf5":
            os.replace(self.work_path, self.path)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(self.work_path, "r") as work:
            provenance = str(work.attrs.get(PROVENANCE_KEY, ""))
            if self.format == "npz":
                _write_npz(work, tmp, self.settings, provenance)
            else:
                _write_safetensors(work, tmp, self.settings, provenance)
        os.replace(tmp, self.path)
        self.work_path.unlink()


def _datasets(work: h5py.File):
    """(key, dataset) of every sequence in the work file (publish dropped incomplete ones)."""
    for name, group in work.items():
        paths: list[str] = []
        group.visit(paths.append)
        for path in paths:
            if isinstance(group[path], h5py.Dataset):
                yield f"{name}/{path}", group[path]


def _loads(text) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _stamp(work: h5py.File, provenance: dict) -> None:
    """The provenance as one JSON attribute (what the other formats carry) and one attribute per field."""
    work.attrs[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    for key, value in provenance.items():
        work.attrs[key] = value


def _write_npz(work: h5py.File, path: Path, settings: str, provenance: str) -> None:
    # One array at a time into the zip, so memory holds one array, not the whole file.
    with zipfile.ZipFile(path, "w") as archive:
        members = [(SETTINGS_KEY, settings), (PROVENANCE_KEY, provenance)]
        for key, dataset in [*members, *_datasets(work)]:
            array = np.asarray(dataset) if isinstance(dataset, str) else dataset[()]
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _write_safetensors(work: h5py.File, path: Path, settings: str, provenance: str) -> None:
    tensors = {key: dataset[()] for key, dataset in _datasets(work)}
    safetensors.numpy.save_file(tensors, str(path), metadata={SETTINGS_KEY: settings, PROVENANCE_KEY: provenance})
