"""`esm2`: embeddings, masked predictions and variant scores from an ESM-2 server.

    esm2 embed proteins.fasta -o out.h5 --model esm2-35m --include mean per_token --repr-layers -1 0
    esm2 predict 'MKT<mask>AYIAK' --top-k 5
    esm2 score --sequence MKTAYIAK --mutations K2A T3G:A4C
    esm2 score --sequence-fasta wt.fasta --scan --positions 10-80 --method wt_marginal -o scan.csv --png scan.png
    esm2 score --pll library.fasta -o pll.csv
    esm2 contacts proteins.fasta --png maps/ --attention
    esm2 health | esm2 models

Every failure is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from esm2_client import scoring
from esm2_client.client import DEFAULT_TARGET, Esm2Client, Esm2Error
from esm2_client.contact_plot import PlotUnavailable
from esm2_client.fasta import InputError, Record, read_fasta
from esm2_client.embedding_store import (
    EmbeddingStore,
    OutputError,
    output_arrays,
    output_format,
)
from esm2_wire import output_kinds
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb
from esm2_wire.provenance import Provenance
from esm2_wire.variants import parse_variant
from esm2_wire.vocabulary import MASK

# The server's names, plus esm-extract's `per_tok`.
INCLUDE_ALIASES = {**output_kinds.ALIASES, "per_tok": "per_token"}
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A request the user must change; one line."""


def _client(args) -> Esm2Client:
    return Esm2Client(args.server, args.api_key, max_in_flight=args.max_in_flight, timeout=args.timeout)


def _open_csv(path: Path | None):
    return open(path, "w", newline="", encoding="utf-8") if path else sys.stdout


class _Interrupts:
    """Ctrl-C and SIGTERM during a run: KeyboardInterrupt at once while the run waits for the
    server, but only after the item being written is whole. Raised in the middle of a write, the
    interrupt can land in a finalizer of h5py's, where Python prints and drops it, and the run then
    goes on waiting for a server that may never answer; `requested` also ends the run at the next
    item if an interrupt was dropped anywhere else."""

    def __init__(self):
        self.requested = False
        self._writing = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if not self._writing:
            raise KeyboardInterrupt

    def write(self, add, *args) -> None:
        """add(*args) with interrupts held back; then KeyboardInterrupt if one came meanwhile."""
        self._writing = True
        try:
            add(*args)
        finally:
            self._writing = False
        if self.requested:
            raise KeyboardInterrupt


# ---- embed -----------------------------------------------------------------------
def _fit_lengths(records: list[Record], limit: int, truncate: int | None, model: str,
                 windowed: int = 0) -> list[Record]:
    """`records` within `limit` residues, cut with --truncate, else refused naming the long ones (and
    --window where the server offers windowed mode up to `windowed` residues)."""
    if truncate is not None:
        cut = limit if truncate <= 0 else min(truncate, limit)
        return [Record(r.id, r.sequence[:cut]) for r in records]
    long = [f"{r.id} ({len(r.sequence)})" for r in records if len(r.sequence) > limit]
    if long:
        shown = ", ".join(long[:20]) + (f" and {len(long) - 20} more" if len(long) > 20 else "")
        raise UsageError(
            f"{len(long)} sequences are longer than {model}'s limit of {limit} residues: {shown}; "
            f"pass --truncate to cut them to {limit}"
            + (f", or --window LENGTH[:STRIDE] (this server embeds up to {windowed} residues in windows)"
               if windowed > limit else "")
        )
    return records


def _window_arg(text: str) -> tuple[int, int]:
    """--window LENGTH[:STRIDE] (argparse type): windowed mode's (length, stride); 0 or no STRIDE: the default."""
    length, _, stride = text.partition(":")
    try:
        window = int(length), int(stride or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LENGTH or LENGTH:STRIDE (e.g. 1022 or 1022:511), got {text!r}") from None
    if min(window) < 0:
        raise argparse.ArgumentTypeError(f"LENGTH and STRIDE must not be negative, got {text!r}")
    return window


def _length_limit(info: pb.ModelInfo, window: tuple[int, int] | None, model: str) -> int:
    """The longest sequence the server takes: its windowed limit with --window."""
    if window is None:
        return info.max_sequence_length
    if not info.max_windowed_residues:
        raise UsageError(f"--window: the server does not offer windowed mode for {model} "
                         "(its --max-windowed-residues is 0)")
    return max(info.max_sequence_length, info.max_windowed_residues)


def cmd_embed(args) -> int:
    output_format(args.output)  # unknown extension: fail before any work
    kinds = {OutputKind(INCLUDE_ALIASES.get(i, i)) for i in args.include}  # argparse checked the names
    include = sorted(kind.value for kind in kinds)
    records = read_fasta(args.fasta)
    with _client(args) as client:
        info = client.model_info(args.model)
        records = _fit_lengths(records, _length_limit(info, args.window, args.model), args.truncate, args.model,
                               0 if args.window else info.max_windowed_residues)
        n = info.num_layers
        bad_layers = [layer for layer in args.repr_layers if not -(n + 1) <= layer <= n]
        if bad_layers:
            raise UsageError(f"--repr-layers {bad_layers}: {args.model} has {n} layers; allowed: {-(n + 1)} to {n}")
        layers = list(dict.fromkeys(layer % (n + 1) for layer in args.repr_layers))
        settings = {"model": args.model, "include": include, "repr_layers": layers, "truncate": args.truncate}
        if args.window is not None:  # a store written without windows is not resumed with them, nor the reverse
            settings["window"] = list(args.window)
        store = EmbeddingStore(args.output, settings, Provenance.of_model_info(info).as_dict())
        done = store.open()
        todo = [r for r in records if r.id not in done]
        written = 0
        interrupts = _Interrupts()
        interrupts.install()
        # The bar starts with the first result, so that a request refused outright
        # (wrong key, bad input) leaves only its one error line.
        bar = None
        try:
            for index, outputs in client.encode_iter(args.model, [r.sequence for r in todo], include, layers,
                                                     window=args.window):
                interrupts.write(store.add, todo[index].id, output_arrays(outputs, kinds))
                written += 1
                if bar is None:
                    bar = tqdm(total=len(records), initial=len(records) - len(todo), unit="seq", desc="embed",
                               disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
                bar.update()
        except KeyboardInterrupt:
            interrupted = True
        else:
            interrupted = False
        finally:
            if bar is not None:
                bar.close()
            store.publish()  # on failure too: keep what finished, a re-run resumes from it
        if interrupted:
            print(f"esm2: interrupted: {len(records) - len(todo) + written} of {len(records)} sequences are in "
                  f"{args.output}; run the same command again to finish", file=sys.stderr)
            return EXIT_INTERRUPTED
    skipped = len(records) - len(todo)
    print(f"esm2: wrote {written} sequences to {args.output}"
          + (f" ({skipped} already there)" if skipped else ""), file=sys.stderr)
    return 0


# ---- contacts -------------------------------------------------------------------------
def _png_names(records: list[Record]) -> list[str]:
    """A file name per record from its id: safe characters only, unique."""
    names, seen = [], set()
    for record in records:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", record.id).strip("._") or "sequence"
        name, n = stem, 1
        while name.lower() in seen:
            n += 1
            name = f"{stem}-{n}"
        seen.add(name.lower())
        names.append(f"{name}.png")
    return names


def cmd_contacts(args) -> int:
    from esm2_client import contact_plot

    contact_plot.figure_class()  # without matplotlib, fail before any work
    records = read_fasta(args.fasta)
    include = ["contacts", "attentions"] if args.attention else ["contacts"]
    with _client(args) as client:
        info = client.model_info(args.model)
        provenance = Provenance.of_model_info(info)
        records = _fit_lengths(records, info.max_sequence_length, args.truncate, args.model)
        names = _png_names(records)
        interrupts = _Interrupts()
        interrupts.install()
        with tqdm(total=len(records), unit="seq", desc="contacts", disable=args.quiet, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for index, outputs in client.encode_iter(args.model, [r.sequence for r in records], include):
                interrupts.write(contact_plot.draw, args.png / names[index], records[index].id,
                                 outputs.get(OutputKind.CONTACTS),
                                 outputs.get(OutputKind.ATTENTIONS) if args.attention else None, provenance)
                bar.update()
    print(f"esm2: drew {len(records)} contact maps in {args.png}", file=sys.stderr)
    return 0


# ---- predict -------------------------------------------------------------------------
def cmd_predict(args) -> int:
    records = [Record(f"seq{i + 1}", s) for i, s in enumerate(args.sequences)]
    if args.fasta:
        records += read_fasta(args.fasta, allowed=None)
    if not records:
        raise UsageError("predict: give masked sequences as arguments or --fasta FILE")
    with _client(args) as client, _open_csv(args.output) as handle:
        writer = csv.writer(handle)
        writer.writerow(["sequence_id", "position", "rank", "token", "probability"])
        for index, outputs in client.predict_iter(args.model, [r.sequence for r in records]):
            for row, token in enumerate(outputs.sequence_tokens):
                if token != MASK:
                    continue
                logits = outputs.logits[row].astype(np.float64)
                probabilities = np.exp(logits - logits.max())
                probabilities /= probabilities.sum()
                for rank, column in enumerate(np.argsort(-probabilities)[: args.top_k], start=1):
                    writer.writerow([records[index].id, row + 1, rank, outputs.vocab_tokens[column],
                                     f"{probabilities[column]:.6g}"])
    return 0


# ---- score ------------------------------------------------------------------------------
def _wild_type(args) -> str:
    if args.sequence:
        return args.sequence
    records = read_fasta(args.sequence_fasta)
    if len(records) != 1:
        raise UsageError(f"{args.sequence_fasta}: expected one wild-type record, found {len(records)}")
    return records[0].sequence


def _variants(args, sequence: str) -> tuple[list[dict], list[str], str]:
    """Rows to write, their column names, and which column holds the mutations."""
    if args.mutations_csv:
        try:
            with open(args.mutations_csv, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                rows, columns = list(reader), list(reader.fieldnames or [])
        except OSError as exc:
            raise UsageError(f"{args.mutations_csv}: {exc.strerror}") from None
        if args.column not in columns:
            raise UsageError(f"{args.mutations_csv}: no column {args.column!r}; columns: {', '.join(columns)}")
        return rows, columns, args.column
    return [{"mutant": m} for m in args.mutations], ["mutant"], "mutant"


_POSITIONS = re.compile(r"([0-9]{1,9})(?:-([0-9]{1,9}))?")


def _positions(text: str | None, sequence: str) -> tuple[int, int]:
    """--positions A-B (or A) as 1-based (first, last); the whole sequence without it."""
    if text is None:
        return 1, len(sequence)
    match = _POSITIONS.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"--positions {text!r}: expected FIRST-LAST, e.g. 10-80 (1-based, inclusive), or one position")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    if not 1 <= first <= last <= len(sequence):
        raise UsageError(f"--positions {text}: the wild type has {len(sequence)} residues; "
                         f"positions run from 1 to {len(sequence)}, first <= last")
    return first, last


def _scan(args, client, sequence: str) -> int:
    """Every single substitution at every position of --positions: a long CSV, and a heatmap with --png."""
    first, last = _positions(args.positions, sequence)
    variants = scoring.scan_variants(sequence, first, last)
    if not variants:
        raise UsageError(f"--positions {first}-{last}: no standard amino acid to mutate there")
    provenance = Provenance.of_model_info(client.model_info(args.model)) if args.png else None
    with tqdm(unit="pass", desc=f"scan ({args.method})", disable=args.quiet, file=sys.stderr,
              dynamic_ncols=True) as bar:
        scores = scoring.variant_scores(client, args.model, sequence, variants, args.method, bar,
                                        window=args.window)
    with _open_csv(args.output) as handle:
        writer = csv.writer(handle)
        writer.writerow(["position", "wild_type", "mutant", "variant", "method", "score"])
        for variant, score in zip(variants, scores):
            writer.writerow([variant[1:-1], variant[0], variant[-1], variant, args.method, f"{score:.6f}"])
    if args.png:
        from esm2_client import scan_plot

        scan_plot.draw(args.png, args.sequence_fasta.stem if args.sequence_fasta else "sequence", sequence, first,
                       last, dict(zip(variants, scores)), args.method, provenance)
    return 0


def cmd_score(args) -> int:
    if args.pll and (args.mutations or args.mutations_csv or args.scan):
        raise UsageError("score: --pll scores whole sequences; --mutations, --mutations-csv and --scan need --sequence")
    if args.scan and (args.mutations or args.mutations_csv):
        raise UsageError("score: --scan scores every substitution itself; leave out --mutations and --mutations-csv")
    if not args.scan and (args.positions or args.png):
        raise UsageError("score: --positions and --png belong to --scan")
    if args.png:
        from esm2_client import contact_plot

        contact_plot.figure_class()  # without matplotlib, fail before any work
    with _client(args) as client:
        if args.pll:
            records = read_fasta(args.pll)
            with _open_csv(args.output) as handle:
                writer = csv.writer(handle)
                writer.writerow(["sequence_id", "length", "scored_positions", "pseudo_log_likelihood", "perplexity"])
                results = scoring.pseudo_log_likelihoods(client, args.model, [r.sequence for r in records],
                                                         window=args.window)
                for record, result in zip(records, tqdm(results, total=len(records), unit="seq", desc="pll",
                                                        disable=args.quiet, file=sys.stderr)):
                    writer.writerow([record.id, len(record.sequence), result.scored_positions,
                                     f"{result.pseudo_log_likelihood:.6f}", f"{result.perplexity:.6f}"])
            return 0
        sequence = _wild_type(args)
        if args.scan:
            return _scan(args, client, sequence)
        rows, columns, column = _variants(args, sequence)
        if not rows:
            raise UsageError("score: no mutations given (use --mutations A23G ... or --mutations-csv FILE)")
        variants, errors = [], []
        for number, row in enumerate(rows, start=1):
            try:
                parse_variant(row[column] or "", sequence)  # every bad row named before any request
                variants.append((row[column] or "").strip())
            except ValueError as exc:
                errors.append(f"row {number}: {exc}" if args.mutations_csv else str(exc))
        if errors:
            raise UsageError(f"{len(errors)} invalid mutations: " + "; ".join(errors[:10])
                             + (f"; and {len(errors) - 10} more" if len(errors) > 10 else ""))
        # Passes, not variants, are the work: large requests stream (ScoreStream) and move the bar as
        # their passes finish.
        with tqdm(unit="pass", desc=args.method.replace("_", " "), disable=args.quiet, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            scores = scoring.variant_scores(client, args.model, sequence, variants, args.method, bar,
                                            window=args.window)
    score_column = f"{args.method}_score"
    with _open_csv(args.output) as handle:
        writer = csv.DictWriter(handle, fieldnames=[*columns, score_column], extrasaction="ignore")
        writer.writeheader()
        for row, score in zip(rows, scores):
            writer.writerow({**row, score_column: f"{score:.6f}"})
    return 0


# ---- health and models -------------------------------------------------------------------
def cmd_health(args) -> int:
    with _client(args) as client:
        status = client.health(timeout=args.timeout or 10)
        models = client.list_models(timeout=args.timeout or 10)
    print(f"{args.server}: {status}")
    for m in models:
        print(f"{m.name}: {'ready' if m.ready else 'loading'}")
    return 0 if status == "SERVING" and all(m.ready for m in models) else 1


def cmd_models(args) -> int:
    with _client(args) as client:
        models = client.list_models()
    header = ("model", "ready", "layers", "dim", "heads", "parameters", "max_items", "max_length", "device", "format",
              "weights")
    formats = {pb.ModelInfo.SOURCE_FORMAT_FAIR_ESM: "fair-esm", pb.ModelInfo.SOURCE_FORMAT_HUGGING_FACE: "huggingface"}
    rows = [
        (m.name, "yes" if m.ready else "no", m.num_layers, m.embed_dim, m.attention_heads, f"{m.parameters:,}",
         m.max_items, m.max_sequence_length, m.device, formats.get(m.source_format, "-"),
         ("RANDOM " if m.random_weights else "") + m.checkpoint
         + (f" (fine-tuned from {m.finetuned_from})" if m.finetuned_from else ""))
        for m in models
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    return 0


# ---- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("ESM2_SERVER", DEFAULT_TARGET),
                        help="HOST:PORT of the gRPC server (env ESM2_SERVER; default %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("ESM2_API_KEY"),
                        help="sent as 'authorization: Token KEY' (env ESM2_API_KEY)")
    common.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    common.add_argument("--max-in-flight", type=int, default=4, help="requests running at once (default 4)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("-m", "--model", default=os.environ.get("ESM2_MODEL", "esm2-8m"),
                       help="served model (env ESM2_MODEL; default %(default)s)")

    parser = argparse.ArgumentParser(prog="esm2", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", parents=[common, model], help="embeddings of a FASTA file into a file")
    embed.add_argument("fasta", type=Path, help="FASTA file, plain or gzipped")
    embed.add_argument("-o", "--output", type=Path, required=True, help=".h5/.hdf5, .npz or .safetensors")
    embed.add_argument("--include", nargs="+", default=["mean"],
                       choices=[*output_kinds.NAMES, *INCLUDE_ALIASES], help="outputs (default mean)")
    embed.add_argument("--repr-layers", type=int, nargs="+", default=[-1],
                       help="layers: 0 = embeddings, -1 = last (default -1)")
    embed.add_argument("--truncate", type=int, nargs="?", const=0, default=None, metavar="N",
                       help="cut longer sequences to N residues (default: the server's limit) instead of failing")
    embed.add_argument("--window", type=_window_arg, metavar="LENGTH[:STRIDE]",
                       help="windowed mode for proteins longer than the model's context: overlapping windows of "
                            "LENGTH residues (0: 1022) every STRIDE (default LENGTH/2), outputs stitched on the server")
    embed.set_defaults(run=cmd_embed)

    contacts = commands.add_parser(
        "contacts", parents=[common, model],
        help="draw each sequence's contact map as a PNG (needs the plot extra; "
             "for the arrays: embed --include contacts)")
    contacts.add_argument("fasta", type=Path, help="FASTA file, plain or gzipped")
    contacts.add_argument("--png", type=Path, required=True, metavar="DIR",
                          help="write <id>.png here, one per sequence")
    contacts.add_argument("--attention", action="store_true",
                          help="a second panel: the mean attention map over layers and heads")
    contacts.add_argument("--truncate", type=int, nargs="?", const=0, default=None, metavar="N",
                          help="cut sequences to N residues (default: the model's limit) instead of failing")
    contacts.set_defaults(run=cmd_contacts)

    predict = commands.add_parser("predict", parents=[common, model], help="top-k tokens at each <mask>")
    predict.add_argument("sequences", nargs="*", help="sequences containing <mask>")
    predict.add_argument("--fasta", type=Path, help="FASTA file of masked sequences")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("-o", "--output", type=Path, help="CSV file (default stdout)")
    predict.set_defaults(run=cmd_predict)

    score = commands.add_parser("score", parents=[common, model],
                                help="variant scores (a list or a whole scan), or pseudo-log-likelihoods")
    target = score.add_mutually_exclusive_group(required=True)
    target.add_argument("--sequence", help="wild-type sequence")
    target.add_argument("--sequence-fasta", type=Path, help="FASTA file holding the wild-type sequence")
    target.add_argument("--pll", type=Path, metavar="FASTA",
                        help="pseudo-log-likelihood and perplexity of every sequence of FASTA")
    score.add_argument("--mutations", nargs="+", default=[], help="e.g. A23G K45R:A2C (1-based positions)")
    score.add_argument("--mutations-csv", type=Path, help="CSV file with a column of mutations")
    score.add_argument("--column", default="mutant", help="mutation column of --mutations-csv (default mutant)")
    score.add_argument("--method", choices=scoring.METHODS, default="masked_marginal",
                       help="how variants are scored (default masked_marginal; docs/scoring.md)")
    score.add_argument("--scan", action="store_true",
                       help="score every single substitution at every position (or --positions): a long CSV")
    score.add_argument("--positions", metavar="FIRST-LAST", help="--scan only these positions, e.g. 10-80 (1-based)")
    score.add_argument("--png", type=Path, metavar="FILE",
                       help="--scan also draws a heatmap here, the wild type ringed (needs the plot extra)")
    score.add_argument("-o", "--output", type=Path, help="CSV file (default stdout)")
    score.add_argument("--window", type=_window_arg, metavar="LENGTH[:STRIDE]",
                       help="windowed mode for proteins longer than the model's context (masked marginals "
                            "averaged over the windows covering each position)")
    score.set_defaults(run=cmd_score)

    health = commands.add_parser("health", parents=[common], help="is the server serving, are models ready")
    health.set_defaults(run=cmd_health)
    models = commands.add_parser("models", parents=[common], help="served models and their limits")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Esm2Error as exc:
        message = str(exc) + (f" (request id {exc.request_id})" if exc.request_id else "")
    except (InputError, OutputError, UsageError, PlotUnavailable) as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    except KeyboardInterrupt:
        message = "interrupted"
        print(f"esm2: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"esm2: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
