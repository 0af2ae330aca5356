"""`esm2` end to end as a subprocess against real servers on 127.0.0.1."""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.numpy
import torch
from support import ESM2_COMMAND, PROVENANCE, REPO, esm2, free_port, start_server, write_fasta
from reference import STANDARD_ORDER, assert_close, reference

from bench import esm_extract
from esm2_client import Esm2Client
from esm2_client.embedding_store import EmbeddingStore, OutputError

AMINO = "ACDEFGHIKLMNPQRSTVWY"
def random_records(count: int, low: int, high: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"p{i}|x": "".join(rng.choice(AMINO) for _ in range(rng.randint(low, high))) for i in range(count)}


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esm2: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- embed ---------------------------------------------------------------------------------
def test_embed_hdf5_from_gzipped_fasta(server, reference_models, tmp_path):
    records = random_records(10, 5, 50, seed=1)
    fasta = write_fasta(tmp_path / "p.fasta.gz", records, gzipped=True)
    out = tmp_path / "out.h5"
    result = esm2("embed", fasta, "-o", out, "--model", "esm2-tiny", "--server", server.target,
                  "--include", "mean", "per_token", "bos", "contacts", "--repr-layers", "-1", "0")
    assert "seq/s" in result.stderr
    with h5py.File(out, "r") as f:
        assert sorted(f[name].attrs["id"] for name in f) == sorted(records)
        for name, sequence in records.items():
            group, expected = f[name], reference(reference_models["esm2-tiny"], sequence)
            for output in ("mean", "bos", "per_token"):
                assert sorted(group[output]) == ["0", "2"]
                for layer in (0, 2):
                    assert_close(group[f"{output}/{layer}"][()], expected[output][layer], f"{name} {output} {layer}")
            assert_close(group["contacts"][()], expected["contacts"], f"{name} contacts")
    assert not (tmp_path / "out.h5.partial.h5").exists()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embed_npz_and_safetensors(server, reference_models, tmp_path, suffix):
    records = {"a/b": "MKTAYIAKQRQISFVKSHFSRQ", "c": "MLKKV"}
    fasta = write_fasta(tmp_path / "p.fasta", records)
    out = tmp_path / f"out{suffix}"
    esm2("embed", fasta, "-o", out, "-m", "esm2-tiny", "--server", server.target, "--include", "mean", "per_tok")
    arrays = dict(np.load(out)) if suffix == ".npz" else safetensors.numpy.load_file(out)
    assert sorted(k for k in arrays if not k.startswith("__")) == [
        "a%2Fb/mean/2", "a%2Fb/per_token/2", "c/mean/2", "c/per_token/2"]
    for key, name in (("a%2Fb", "a/b"), ("c", "c")):
        expected = reference(reference_models["esm2-tiny"], records[name])
        assert_close(arrays[f"{key}/mean/2"], expected["mean"][2], name)
        assert_close(arrays[f"{key}/per_token/2"], expected["per_token"][2], name)
    again = esm2("embed", fasta, "-o", out, "-m", "esm2-tiny", "--server", server.target,
                 "--include", "mean", "per_tok")
    assert "wrote 0 sequences" in again.stderr and "(2 already there)" in again.stderr


def _interrupt_mid_run(work: Path, proc: subprocess.Popen, server, how: signal.Signals, min_bytes: int) -> None:
    """Send `how` once the run has written some sequences but cannot have finished.

    Progress is checked with the server frozen (SIGSTOP), so no further answer can arrive
    between the check and the signal, however slow or busy the machine is.
    """
    end = time.monotonic() + 120
    try:
        while time.monotonic() < end and proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGSTOP)
            if work.exists() and work.stat().st_size > min_bytes:
                proc.send_signal(how)
                proc.wait(60)  # it needs nothing from the frozen server to stop
                return
            os.kill(server.proc.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    pytest.fail(f"no progress before the run ended (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_embed_resumes_after_interruption(server, reference_models, tmp_path, how):
    # 6 requests of 8, a few written before the signal; other sequences per case: the server's
    # result cache would answer repeats at once.
    records = random_records(48, 80, 150, seed=2 + int(how))
    fasta = write_fasta(tmp_path / "p.fasta", records)
    out = tmp_path / "out.h5"
    args = ["embed", fasta, "-o", out, "-m", "esm2-8m", "--server", server.target, "--include", "mean", "per_token",
            "--max-in-flight", "1"]
    proc = subprocess.Popen([*ESM2_COMMAND, *map(str, args)], stderr=subprocess.PIPE, text=True)
    _interrupt_mid_run(tmp_path / "out.h5.partial.h5", proc, server, how, min_bytes=300_000)
    _, stderr = proc.communicate(timeout=60)
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again" in stderr
        with h5py.File(out, "r") as f:  # published, valid, partial
            assert 0 < len(f) < len(records)
    else:
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # never half-written: only replaced whole at the end
    rerun = esm2(*args, "-q")
    assert "already there" in rerun.stderr
    with h5py.File(out, "r") as f:
        assert sorted(f[name].attrs["id"] for name in f) == sorted(records)
        for name in list(records)[:3] + list(records)[-2:]:
            expected = reference(reference_models["esm2-8m"], records[name])
            assert_close(f[name]["mean/6"][()], expected["mean"][6], name)
            assert_close(f[name]["per_token/6"][()], expected["per_token"][6], name)


class _InterruptedArrays(dict):
    """The arrays of one sequence, with Ctrl-C arriving after the first is written."""

    def items(self):
        yield "mean/1", np.zeros(4, np.float32)
        raise KeyboardInterrupt


@pytest.mark.parametrize("suffix", [".h5", ".npz", ".safetensors"])
def test_a_sequence_cut_short_is_neither_published_nor_resumed_from(tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    settings = {"model": "esm2-tiny", "include": ["mean"], "repr_layers": [1], "truncate": None}
    store = EmbeddingStore(out, settings, PROVENANCE)
    assert store.open() == set()
    store.add("a", {"mean/1": np.ones(4, np.float32)})
    with pytest.raises(KeyboardInterrupt):
        store.add("b", _InterruptedArrays())
    # An interruption that also cut add's own clean-up short leaves a group without the mark.
    unfinished = store._file.create_group("c")
    unfinished.attrs["id"] = "c"
    unfinished.create_dataset("mean/1", data=np.ones(4, np.float32))
    store.publish()
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            assert list(f) == ["a"]
    else:
        arrays = dict(np.load(out)) if suffix == ".npz" else safetensors.numpy.load_file(out)
        assert sorted(k for k in arrays if not k.startswith("__")) == ["a/mean/1"]
    resumed = EmbeddingStore(out, settings, PROVENANCE)
    assert resumed.open() == {"a"}  # b and c are written again by the re-run
    resumed.publish()


def test_other_settings_leave_no_work_file_behind(server, tmp_path):
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKTAY"})
    out = tmp_path / "out.npz"
    common = ["-m", "esm2-tiny", "--server", server.target]
    esm2("embed", fasta, "-o", out, *common)
    assert_one_error_line(esm2("embed", fasta, "-o", out, *common, "--include", "bos", check=False),
                          f"{out} was written with other settings", f"delete {out} to start over")
    assert not (tmp_path / "out.npz.partial.h5").exists()
    out.unlink()  # as the message says: the next run starts over
    esm2("embed", fasta, "-o", out, *common, "--include", "bos")
    assert sorted(k for k in np.load(out).files if not k.startswith("__")) == ["a/bos/2"]


def test_other_settings_in_the_work_file_name_it(tmp_path):
    out = tmp_path / "out.h5"
    work = tmp_path / "out.h5.partial.h5"
    store = EmbeddingStore(out, {"include": ["mean"]}, PROVENANCE)
    store.open()
    store.add("a", {"mean/1": np.ones(4, np.float32)})
    store.publish()
    os.replace(out, work)  # what a killed run leaves: work, no output
    with pytest.raises(OutputError, match=f"{re.escape(str(work))} was written with other settings.*delete {re.escape(str(work))}"):
        EmbeddingStore(out, {"include": ["bos"]}, PROVENANCE).open()
    assert work.exists()  # another run's work: the user decides


def _run_esm_extract(checkpoint: Path, fasta: Path, out_dir: Path, layers: list[int], truncation: int) -> dict:
    """fair-esm's esm-extract as a process; where the wheel lacks it (fair-esm 2.0.0 on PyPI ships
    no scripts), bench/esm_extract.py: the same pipeline from fair-esm's own parts."""
    result = subprocess.run(
        [*esm_extract.command(), checkpoint, fasta, out_dir, "--repr_layers", *map(str, layers), "--include", "mean", "per_tok",
         "bos", "contacts", "--truncation_seq_length", str(truncation), "--nogpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        # Our own freshly written checkpoint pickles argparse.Namespace, which torch's
        # weights_only default refuses; esm-extract predates that default.
        env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert result.returncode == 0, result.stderr
    return {p.stem: torch.load(p, weights_only=True) for p in out_dir.glob("*.pt")}


def test_embed_matches_esm_extract(server, tiny_checkpoint, tmp_path):
    records = random_records(6, 10, 80, seed=3)
    records["long"] = random_records(1, 1100, 1100, seed=4).popitem()[1]  # esm-extract cuts at 1022
    fasta = write_fasta(tmp_path / "p.fasta", records)
    out = tmp_path / "out.h5"
    esm2("embed", fasta, "-o", out, "-m", "esm2-tiny", "--server", server.target, "--include", "mean", "per_tok",
         "bos", "contacts", "--repr-layers", "0", "-1", "--truncate", "1022")
    expected = _run_esm_extract(tiny_checkpoint, fasta, tmp_path / "extract", [0, -1], 1022)
    assert sorted(expected) == sorted(records)
    with h5py.File(out, "r") as f:
        for name, want in expected.items():
            group = f[name]
            assert group["per_token/2"].shape[0] == min(1022, len(records[name]))
            for layer in (0, 2):
                assert_close(group[f"mean/{layer}"][()], want["mean_representations"][layer].numpy(), name)
                assert_close(group[f"per_token/{layer}"][()], want["representations"][layer].numpy(), name)
                assert_close(group[f"bos/{layer}"][()], want["bos_representations"][layer].numpy(), name)
            assert_close(group["contacts"][()], want["contacts"].numpy(), name)


# ---- predict and score ----------------------------------------------------------------------
def _masked_log_probs(loaded, sequence: str, position: int) -> np.ndarray:
    """Direct fair-esm: log-softmax over the 20 standard amino acids at `position` (1-based), masked alone."""
    masked = sequence[: position - 1] + "<mask>" + sequence[position:]
    _, _, tokens = loaded.alphabet.get_batch_converter()([("x", masked)])
    with torch.no_grad():
        logits = loaded.model(tokens)["logits"][0, position]
    columns = [loaded.alphabet.get_idx(a) for a in STANDARD_ORDER]
    return torch.log_softmax(logits[columns].double(), dim=-1).numpy()


def test_predict_top_k(server, reference_models):
    result = esm2("predict", "MKT<mask>AYIAK<mask>R", "--top-k", "3", "-m", "esm2-tiny", "--server", server.target)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["position"], r["rank"]) for r in rows] == [("4", "1"), ("4", "2"), ("4", "3"),
                                                          ("10", "1"), ("10", "2"), ("10", "3")]
    logits = reference(reference_models["esm2-tiny"], "MKT<mask>AYIAK<mask>R")["logits"].astype(np.float64)
    for row in rows:
        p = np.exp(logits[int(row["position"]) - 1] - logits[int(row["position"]) - 1].max())
        p /= p.sum()
        order = np.argsort(-p)
        column = order[int(row["rank"]) - 1]
        assert row["token"] == STANDARD_ORDER[column]
        assert float(row["probability"]) == pytest.approx(p[column], rel=1e-4)


def test_score_mutations_equal_direct_masked_marginals(server, reference_models, tmp_path):
    wild_type = "MKTAYIAKQRQISFVKSHFSRQ"
    table = tmp_path / "variants.csv"
    table.write_text("name,mutant\nv1,K2A\nv2,T3G:A4C\nv3,Q22W\n")
    result = esm2("score", "--sequence", wild_type, "--mutations-csv", table, "-m", "esm2-8m",
                  "--server", server.target, "-o", tmp_path / "scores.csv")
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["name"] for r in rows] == ["v1", "v2", "v3"] and result.stdout == ""
    column = {a: i for i, a in enumerate(STANDARD_ORDER)}

    def direct(mutations):
        total = 0.0
        for wt, pos, mt in mutations:
            lp = _masked_log_probs(reference_models["esm2-8m"], wild_type, pos)
            total += lp[column[mt]] - lp[column[wt]]
        return total

    expected = [direct([("K", 2, "A")]), direct([("T", 3, "G"), ("A", 4, "C")]), direct([("Q", 22, "W")])]
    for row, want in zip(rows, expected):
        assert float(row["masked_marginal_score"]) == pytest.approx(want, abs=1e-4)
    inline = esm2("score", "--sequence", wild_type, "--mutations", "K2A", "-m", "esm2-8m", "--server", server.target)
    assert float(list(csv.DictReader(io.StringIO(inline.stdout)))[0]["masked_marginal_score"]) == pytest.approx(
        expected[0], abs=1e-4)


def test_score_pseudo_log_likelihood_equals_direct(server, reference_models, tmp_path):
    records = {"a": "MKTAYIAKQR", "b": "MLKXVW"}  # X is not scored
    fasta = write_fasta(tmp_path / "p.fasta", records)
    result = esm2("score", "--pll", fasta, "-m", "esm2-tiny", "--server", server.target, "-q")
    rows = {r["sequence_id"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    column = {a: i for i, a in enumerate(STANDARD_ORDER)}
    for name, sequence in records.items():
        positions = [i for i, a in enumerate(sequence, 1) if a in column]
        pll = sum(_masked_log_probs(reference_models["esm2-tiny"], sequence, p)[column[sequence[p - 1]]]
                  for p in positions)
        assert int(rows[name]["scored_positions"]) == len(positions)
        assert float(rows[name]["pseudo_log_likelihood"]) == pytest.approx(pll, abs=1e-4)
        assert float(rows[name]["perplexity"]) == pytest.approx(np.exp(-pll / len(positions)), rel=1e-5)


@pytest.mark.parametrize("method", ["masked_marginal", "wt_marginal", "pll"])
def test_score_scan_csv_equals_score_calls_made_one_by_one(server, tmp_path, method):
    wild_type = "MKTAYXAKQR"  # X (position 6) has no substitutions
    out = tmp_path / "scan.csv"
    esm2("score", "--sequence", wild_type, "--scan", "--positions", "5-7", "--method", method, "-m", "esm2-tiny",
         "--server", server.target, "-o", out)
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["position", "wild_type", "mutant", "variant", "method", "score"]
    mutants = "ACDEFGHIKLMNPQRSTVWY"
    assert [(r["position"], r["wild_type"], r["mutant"], r["variant"]) for r in rows] == [
        (str(p), wild_type[p - 1], m, f"{wild_type[p - 1]}{p}{m}") for p in (5, 7) for m in mutants
        if m != wild_type[p - 1]]
    assert {r["method"] for r in rows} == {method}
    with Esm2Client(server.target) as client:
        for row in rows:
            (alone,) = client.score("esm2-tiny", [(wild_type, [row["variant"]])], method)
            assert float(row["score"]) == pytest.approx(alone.scores[0], abs=5e-7), row


def test_score_scan_heatmap_and_position_errors(server, tmp_path):
    from PIL import Image

    wild_type = "MKTAYIAKQR"
    common = ["-m", "esm2-tiny", "--server", server.target]
    esm2("score", "--sequence", wild_type, "--scan", "--png", tmp_path / "scan.png", "-o", tmp_path / "scan.csv",
         *common)
    with Image.open(tmp_path / "scan.png") as image:
        assert image.text["Title"] == "RANDOM WEIGHTS (meaningless): sequence: masked_marginal scan"
        assert image.size == (80 + 150 + 420, 60 + 60 + 14 * 20)
    assert len(list(csv.DictReader(open(tmp_path / "scan.csv")))) == 10 * 19
    for positions, fragment in (("0-3", "positions run from 1 to 10"), ("5-11", "positions run from 1 to 10"),
                                ("7-5", "first <= last"), ("ten", "expected FIRST-LAST, e.g. 10-80")):
        assert_one_error_line(esm2("score", "--sequence", wild_type, "--scan", "--positions", positions, *common,
                                   check=False), f"--positions {positions!r}" if positions == "ten"
                              else f"--positions {positions}", fragment)
    assert_one_error_line(esm2("score", "--sequence", wild_type, "--scan", "--mutations", "K2A", *common, check=False),
                          "--scan scores every substitution itself")
    assert_one_error_line(esm2("score", "--sequence", wild_type, "--positions", "2-3", *common, check=False),
                          "--positions and --png belong to --scan")


# ---- health, models, failures ------------------------------------------------------------------
def test_health_and_models(server):
    health = esm2("health", "--server", server.target)
    assert health.stdout.splitlines() == [f"{server.target}: SERVING", "esm2-8m: ready", "esm2-tiny: ready"]
    models = esm2("models", "--server", server.target).stdout.splitlines()
    assert models[0].split()[:3] == ["model", "ready", "layers"]
    assert [line.split()[:3] for line in models[1:]] == [["esm2-8m", "yes", "6"], ["esm2-tiny", "yes", "2"]]


def test_user_errors_are_one_line(server, tmp_path):
    good = write_fasta(tmp_path / "good.fasta", {"a": "MKTAY"})
    bad = tmp_path / "bad.fasta"
    bad.write_text("this is not fasta\n")
    long = write_fasta(tmp_path / "long.fasta", {"ok": "MKT", "big": "A" * 2100, "huge": "M" * 2200})
    target = ["--server", server.target]
    assert_one_error_line(esm2("embed", bad, "-o", tmp_path / "o.h5", *target, check=False), "bad.fasta")
    assert_one_error_line(esm2("embed", tmp_path / "missing.fa", "-o", tmp_path / "o.h5", *target, check=False),
                          "missing.fa: no such file")
    assert_one_error_line(esm2("embed", good, "-o", tmp_path / "o.h5", "-m", "esm2-3b", *target, check=False),
                          "model 'esm2-3b' is not served", "esm2-8m, esm2-tiny")
    assert_one_error_line(esm2("embed", long, "-o", tmp_path / "o.h5", "-m", "esm2-tiny", *target, check=False),
                          "2 sequences are longer than esm2-tiny's limit of 2048 residues: big (2100), huge (2200)",
                          "--truncate")
    truncated = esm2("embed", long, "-o", tmp_path / "t.h5", "-m", "esm2-tiny", "--include", "per_token", "--truncate",
                     *target)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["huge/per_token/2"].shape == (2048, 64) and f["ok/per_token/2"].shape == (3, 64)
    assert "wrote 3 sequences" in truncated.stderr
    assert_one_error_line(esm2("score", "--sequence", "MKTAY", "--mutations", "K3A", "-m", "esm2-tiny", *target,
                               check=False), "the wild type at position 3 is T, not K")
    assert_one_error_line(esm2("embed", good, "-o", tmp_path / "o.h5", "--server", f"127.0.0.1:{free_port()}",
                               "--timeout", "1", check=False), "is unavailable")


def test_wrong_api_key_is_one_line(tmp_path, tiny, server_factory):
    keyed = server_factory(models=tiny, env={"ESM_API_KEYS": "sesame"})
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKTAY"})
    common = ["-m", "esm2-tiny", "--server", keyed.target]
    assert_one_error_line(esm2("embed", fasta, "-o", tmp_path / "o.h5", *common, "--api-key", "nope", check=False),
                          "UNAUTHENTICATED", "API key")
    esm2("embed", fasta, "-o", tmp_path / "o.h5", *common, env={**os.environ, "ESM2_API_KEY": "sesame"})
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert list(f) == ["a"]


# ---- contacts --png -------------------------------------------------------------------------
CONTACT_SEQS = {"p1 first": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "weird/id": "GSHMSLFDFFKNKGSEQNAVLKAW"}


@pytest.fixture(scope="module")
def sharp_contacts_server(tmp_path_factory):
    """A tiny random checkpoint whose contact head is scaled and centred on the test sequences, so
    that its probabilities spread over 0..1 (a random head's all sit near 0.58) and a picture
    drawn on a fixed 0..1 colour scale has something to show."""
    from reference import reference as reference_outputs

    from service.models.checkpoints import load
    from service.models.random_checkpoints import write_random_checkpoint

    directory = tmp_path_factory.mktemp("sharp-contacts")
    checkpoint = write_random_checkpoint("tiny", directory, seed=5)
    regression_path = checkpoint.with_name(f"{checkpoint.stem}-contact-regression.pt")
    regression = torch.load(regression_path)
    weight, bias = regression["model"]["contact_head.regression.weight"], regression["model"]["contact_head.regression.bias"]
    loaded = load("esm2-tiny", checkpoint)
    probabilities = np.concatenate([reference_outputs(loaded, s)["contacts"].ravel() for s in CONTACT_SEQS.values()])
    z = np.log(probabilities / (1 - probabilities)) - float(bias)  # the head's input to its bias and sigmoid
    scale = 2.5 / float(z.std())
    weight.mul_(scale)
    bias.fill_(-scale * float(np.median(z)))
    torch.save(regression, regression_path)
    with start_server(directory, models={"esm2-tiny": checkpoint}) as proc:
        yield proc


def _map_cells(png: np.ndarray, panel: int, length: int) -> np.ndarray:
    """RGB at each residue cell's centre of one panel's map, [length, length, 3]."""
    from esm2_client.contact_plot import MAP_ORIGIN_PX, MAP_PX, PANEL_PX

    cell = MAP_PX / length
    centres = (np.arange(length) + 0.5) * cell
    columns = np.floor(panel * PANEL_PX[0] + MAP_ORIGIN_PX[0] + centres).astype(int)
    rows = np.floor(PANEL_PX[1] - MAP_ORIGIN_PX[1] - MAP_PX + centres).astype(int)  # image rows run downwards
    return png[rows[:, None], columns[None, :], :3]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def test_contacts_png_draws_the_servers_contact_and_attention_maps(sharp_contacts_server, tmp_path):
    import matplotlib.image

    from esm2_client import Esm2Client
    from esm2_client.contact_plot import MAP_ORIGIN_PX, MAP_PX, PANEL_PX, top_contacts
    from esm2_wire.output_kinds import OutputKind

    target = sharp_contacts_server.target
    fasta = write_fasta(tmp_path / "in.fasta", CONTACT_SEQS)
    done = esm2("contacts", fasta, "--png", tmp_path / "maps", "-m", "esm2-tiny", "--server", target, "-q")
    assert "drew 2 contact maps" in done.stderr
    esm2("contacts", fasta, "--png", tmp_path / "both", "-m", "esm2-tiny", "--server", target, "-q", "--attention")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["p1.png", "weird_id.png"]
    with Esm2Client(target) as client:
        served = client.encode("esm2-tiny", list(CONTACT_SEQS.values()), ["contacts", "attentions"])
    for name, outputs in zip(["p1.png", "weird_id.png"], served):
        contacts, attention = outputs.get(OutputKind.CONTACTS), outputs.get(OutputKind.ATTENTIONS)
        length = contacts.shape[0]
        assert contacts.max() - contacts.min() > 0.5  # the sharpened head spreads them
        one = matplotlib.image.imread(tmp_path / "maps" / name)
        two = matplotlib.image.imread(tmp_path / "both" / name)
        assert one.shape[:2] == (PANEL_PX[1], PANEL_PX[0]) and two.shape[:2] == (PANEL_PX[1], 2 * PANEL_PX[0])
        # Bright cells are likely contacts: below the diagonal (no marks there) each cell's lightness
        # follows the server's probability, and the attention panel follows the server's attention.
        below = np.tril_indices(length)
        for png in (one, two):
            lightness = _luminance(_map_cells(png, 0, length))
            assert np.corrcoef(lightness[below], contacts[below])[0, 1] > 0.97
        lightness = _luminance(_map_cells(two, 1, length))
        assert np.corrcoef(lightness.ravel(), attention.ravel())[0, 1] > 0.97
        # Each of the top-L contacts has a red ring around its cell above the diagonal, and nothing
        # red lies below it.
        red = (one[..., 0] > 0.7) & (one[..., 1] < 0.4) & (one[..., 2] < 0.4)
        cell = MAP_PX / length
        top, left = PANEL_PX[1] - MAP_ORIGIN_PX[1] - MAP_PX, MAP_ORIGIN_PX[0]
        pairs = top_contacts(contacts)
        assert len(pairs) == length and all(j - i >= 6 for i, j in pairs)
        for i, j in pairs:
            y, x = int(top + (i + 0.5) * cell), int(left + (j + 0.5) * cell)
            assert red[y - 6:y + 7, x - 6:x + 7].any(), (i, j)
        rows, columns = np.nonzero(red)
        inside = (columns > left) & (columns < left + MAP_PX) & (rows > top) & (rows < top + MAP_PX)
        row_cell, column_cell = (rows[inside] - top) / cell, (columns[inside] - left) / cell
        assert inside.any() and (column_cell - row_cell > 6 - 1.5).all()  # rings sit at j - i >= 6


def test_contacts_without_matplotlib_is_one_line_before_any_work(tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", {"a": "MKTAY"})
    code = ("import sys; sys.modules['matplotlib'] = None; from esm2_client.cli import main; "
            f"sys.exit(main(['contacts', {str(fasta)!r}, '--png', {str(tmp_path / 'maps')!r}, "
            f"'--server', '127.0.0.1:{free_port()}', '--timeout', '1']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert_one_error_line(result, "needs matplotlib", "esm2-service[plot]")
    assert not (tmp_path / "maps").exists()


def test_score_refuses_variants_outside_the_strict_grammar_before_sending(tmp_path, server):
    """Issue 32: the CLI reads variants with the server's grammar (esm2_wire.variants), so a
    table with whitespace or another script's digits is named row by row, not sent."""
    table = tmp_path / "variants.csv"
    table.write_text("name,mutant\nv1,K2A\nv2, K2A\nv3,K\u0662A\nv4,K2A\t:T3G\n", encoding="utf-8")
    assert_one_error_line(esm2("score", "--sequence", "MKTAY", "--mutations-csv", table, "-m", "esm2-tiny",
                               "--server", server.target, check=False),
                          "3 invalid mutations", "row 2: ' K2A'", "row 3: 'K\\u0662A'", "row 4: 'K2A\\t:T3G'")
