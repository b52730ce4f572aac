"""The `encodec-jax` command line: a thin layer of argument parsing over the library.

    encodec-jax encode IN... -o OUT          audio -> codes (.npz, or .ecdc for 24/48 kHz)
    encodec-jax decode CODES -o OUT.wav      codes -> audio
    encodec-jax reconstruct IN -o OUT.wav    audio -> codes -> audio
    encodec-jax stream IN|- -o OUT           the same, chunk by chunk as the audio arrives
    encodec-jax tokenize SOURCE -o OUT       a corpus -> Parquet shards of codes
    encodec-jax eval DATA -o OUT_DIR         quality per bandwidth, code statistics, a plot
    encodec-jax convert SRC OUT              PyTorch checkpoints -> encodec-jax directories
    encodec-jax train --data DIR --out RUN   train or fine-tune on a folder of audio

Every failure is one line on stderr and a non-zero exit status; outputs are written under a
temporary name and renamed into place, so a failed command leaves no partial file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

DEFAULT_MODEL = "facebook/encodec_32khz"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument(
        "--local-files-only", action="store_true", help="use the Hub cache only (offline)"
    )


def _add_model_options(
    parser: argparse.ArgumentParser, bandwidth: bool = True, default: str = DEFAULT_MODEL
) -> None:
    parser.add_argument(
        "--model", default=None, help=f"Hub id or local checkpoint directory (default: {default})"
    )
    if bandwidth:
        parser.add_argument(
            "--bandwidth",
            type=float,
            default=None,
            help="target bandwidth in kbps, one of the model's (default: its smallest)",
        )
    _add_hub_options(parser)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _load_model(args: argparse.Namespace, name: str | None = None):
    """The model named by --model (or `name`), with --bandwidth checked against it."""
    from .model import EncodecModel

    name = name or args.model or DEFAULT_MODEL
    model = EncodecModel.from_pretrained(
        name,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
    )
    if getattr(args, "bandwidth", None) is not None:
        model.config.num_quantizers_for_bandwidth(args.bandwidth)  # raises for a bad one
    return model, name


def _encode_file(model, name: str, path: str, bandwidth: float | None):
    """(Codes, notes) of one audio file."""
    from .audio import load_audio
    from .codes import codes_from_encoding

    config = model.config
    audio, notes = load_audio(path, config.sampling_rate, config.audio_channels)
    encoded = model.encode(audio[None], bandwidth=bandwidth)
    return codes_from_encoding(encoded, config, name, bandwidth, audio.shape[-1]), notes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(codes) -> str:
    chunks = codes.audio_codes.shape[0]
    return (
        f"{codes.num_samples / codes.sample_rate:.2f} s, {codes.n_q} codebooks x "
        f"{sum(codes.chunk_frames)} frames"
        + (f" in {chunks} chunks" if chunks > 1 else "")
        + f", {codes.bandwidth:g} kbps"
    )


def _encode(args: argparse.Namespace) -> int:
    from .codes import CodesError, codes_format, ecdc_model_name, save_codes

    single = len(args.inputs) == 1 and not (
        os.path.isdir(args.output) or args.output.endswith(("/", os.sep))
    )
    if single:
        fmt = codes_format(args.output)
        if args.format is not None and args.format != fmt:
            raise CodesError(f"--format {args.format} contradicts the extension of {args.output}")
        outputs = [args.output]
    else:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise CodesError(
                f"with several inputs, -o must be a directory; {args.output} is a file"
            )
        fmt = args.format or "npz"
        outputs = [
            os.path.join(args.output, os.path.splitext(os.path.basename(p))[0] + "." + fmt)
            for p in args.inputs
        ]
        seen: dict[str, str] = {}
        for path, out in zip(args.inputs, outputs, strict=True):
            if out in seen:
                raise CodesError(f"{seen[out]} and {path} would both be written to {out}")
            seen[out] = path
    model, name = _load_model(args)
    if fmt == "ecdc":
        ecdc_model_name(model.config)  # before any work: .ecdc holds only two models
    # Codes are small: keep them all and write at the end, so that a failing input leaves
    # no output behind.
    results = []
    for path in args.inputs:
        codes, notes = _encode_file(model, name, path, args.bandwidth)
        for note in notes:
            print(f"note: {path}: {note}")
        results.append(codes)
    if not single:
        os.makedirs(args.output, exist_ok=True)
    for path, out, codes in zip(args.inputs, outputs, results, strict=True):
        save_codes(out, codes, model.config)
        print(f"{path} -> {out}: {_describe(codes)}")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from .audio import check_writable_format, save_audio
    from .codes import CodesError, check_codes_fit, codes_format, load_codes

    check_writable_format(args.output)
    is_ecdc = codes_format(args.codes) == "ecdc"
    codes = load_codes(args.codes)
    if is_ecdc and args.model is None:
        raise CodesError(
            f"{args.codes} holds codes of the encodec package's {codes.model} and does not say "
            f"where its weights are: give the model with --model (e.g. --model "
            f"facebook/{codes.model})"
        )
    if args.model is None and not is_ecdc:
        # The .npz names the model that made it: decode with that one unless told otherwise.
        try:
            model, name = _load_model(args, codes.model)
        except Exception as err:
            raise CodesError(
                f"cannot load the model {codes.model} that {args.codes} names ({_first_line(err)})"
                "; give the model with --model"
            ) from None
    else:
        model, name = _load_model(args)
    check_codes_fit(codes, model.config, name)
    if not is_ecdc and codes.model != name:
        print(f"note: {args.codes} was made with {codes.model}; decoding with {name}")
    audio = model.decode(**codes.decode_args()).audio_values
    import numpy as np

    audio = np.asarray(audio)[0, :, : codes.num_samples]
    save_audio(args.output, audio, codes.sample_rate)
    print(f"{args.codes} -> {args.output}: {_describe(codes)}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from .audio import check_writable_format, save_audio

    check_writable_format(args.output)
    model, name = _load_model(args)
    codes, notes = _encode_file(model, name, args.input, args.bandwidth)
    for note in notes:
        print(f"note: {args.input}: {note}")
    import numpy as np

    audio = model.decode(**codes.decode_args()).audio_values
    save_audio(args.output, np.asarray(audio)[0, :, : codes.num_samples], codes.sample_rate)
    print(f"{args.input} -> {args.output}: {_describe(codes)}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    from .audio import AudioError, check_writable_format
    from .codes import FORMATS
    from .streaming.pipeline import AudioSource, RawFormat, stream

    raw = None
    raw_options = {"--rate": args.rate, "--channels": args.channels}
    if args.input == "-":
        if args.rate is None:
            raise AudioError("raw PCM on stdin (IN = -) needs its sampling rate: give --rate")
        raw = RawFormat(args.rate, args.channels or 1, args.pcm_format)
    elif any(v is not None for v in raw_options.values()) or args.pcm_format != "s16":
        given = [k for k, v in raw_options.items() if v is not None] or ["--pcm-format"]
        raise AudioError(f"{given[0]} describes raw PCM on stdin; it needs IN = -")
    if os.path.splitext(args.output)[1].lower().lstrip(".") not in FORMATS:
        check_writable_format(args.output)  # before loading anything
    model, name = _load_model(args)
    config = model.config
    source = AudioSource(
        sys.stdin.buffer if raw else args.input, config.sampling_rate, config.audio_channels, raw
    )
    report = stream(model, name, source, args.output, args.bandwidth, args.chunk_frames)
    label = "stdin" if raw else args.input
    for note in source.notes:
        print(f"note: {label}: {note}")
    print(f"{label} -> {args.output}: {_describe(report.codes)}")
    rtf = report.real_time_factor
    pace = f"{1 / rtf:.1f}x faster than" if rtf < 1 else f"{rtf:.1f}x slower than"
    print(
        f"real-time factor {rtf:.3f} ({pace} real time: {report.compute_seconds:.2f} s of "
        f"compute for {report.seconds_of_audio:.2f} s of audio; compilation "
        f"{report.compile_seconds:.1f} s before the stream)"
    )
    print(
        f"latency {report.latency_ms:.1f} ms (chunk and look-ahead) + compute "
        f"{report.step_ms_median:.1f} ms median, {report.step_ms_p99:.1f} ms p99 per step "
        f"({report.steps} steps); {report.startup_ms:.1f} ms buffered before the first output"
    )
    return 0


def _add_source_options(parser: argparse.ArgumentParser, what: str) -> None:
    """What `corpus.open_source` needs to read a corpus, for the commands that read one."""
    parser.add_argument(
        "--source-type",
        choices=["auto", "folder", "parquet", "webdataset", "saved", "hf"],
        default="auto",
        help=f"what {what} is (default: by its form; hf: datasets.load_dataset, streaming)",
    )
    parser.add_argument("--split", default=None, help="dataset split (default: train)")
    parser.add_argument("--config", default=None, help="dataset configuration (Hub datasets)")
    parser.add_argument(
        "--audio-column",
        default=None,
        metavar="NAME",
        help="column holding the audio (default: audio); for .tar shards the audio member's "
        "extension (default: the member with an audio extension)",
    )
    parser.add_argument(
        "--id-column", default=None, metavar="NAME", help="column whose value keys each row"
    )


def _source_options(args: argparse.Namespace) -> dict:
    return {
        "kind": args.source_type,
        "split": args.split,
        "config": args.config,
        "audio_column": args.audio_column,
        "id_column": args.id_column,
    }


def _tokenize(args: argparse.Namespace) -> int:
    from .corpus import open_source
    from .tokenize import EXIT_SOME_FAILED, tokenize_source

    if args.distributed:
        import jax

        jax.distributed.initialize()
    source = open_source(
        args.source,
        **_source_options(args),
        keep_columns=[c.strip() for c in args.keep_columns.split(",")] if args.keep_columns else (),
        exclude=args.output,
    )
    model, name = _load_model(args)
    buckets = None
    if args.buckets:
        buckets = [round(s * model.config.sampling_rate) for s in args.buckets]
    result = tokenize_source(
        model,
        source,
        args.output,
        model_name=name,
        bandwidth=args.bandwidth,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        buckets=buckets,
        exact=args.exact,
        workers=args.workers,
        progress=not args.no_progress,
    )
    seconds = max(result.seconds, 1e-9)
    print(
        f"tokenized {result.processed_items} items ({result.audio_seconds / 3600:.3f} h of "
        f"audio) in {result.seconds:.1f} s: {result.processed_items / seconds:.2f} items/s, "
        f"{result.audio_seconds / seconds:.1f}x realtime; {result.items} items, "
        f"{result.shards} shards in {args.output}"
        + (
            f" ({result.items - result.processed_items} done by an earlier run)"
            if result.processed_items < result.items
            else ""
        )
    )
    if result.failed:
        print(
            f"encodec-jax tokenize: {result.failed} of {result.items} items failed; see "
            f"{result.errors_path}",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0


def _bandwidth_list(text: str) -> list[float] | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        values = [_positive_float(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated kbps (e.g. 1.5,3,6) or 'all', got {text!r}"
        )
    return values


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import (
        EXIT_SOME_FAILED,
        EvalError,
        evaluate,
        format_table,
        open_eval_data,
        resolve_bandwidths,
        write_results,
    )

    names = args.model or [DEFAULT_MODEL]
    if len(set(names)) != len(names):
        raise EvalError("a model is named twice by --model")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise EvalError(f"output {args.output} exists and is not a folder")
    source = open_eval_data(args.data, **_source_options(args))  # fails before models load
    if args.visqol and not args.speech:
        raise EvalError("--visqol needs --speech")
    models = {}
    for name in names:
        model, _ = _load_model(args, name)
        resolve_bandwidths(model, args.bandwidths, name)  # every model checked before work
        models[name] = model
    visqol = False if args.no_visqol else (True if args.visqol else None)
    if args.speech and visqol is None:
        from .metrics import visqol_available

        if not visqol_available():
            print(
                "note: no ViSQOL: visqol-python is not installed "
                "(pip install 'visqol-python[lattice]')"
            )
    result = evaluate(
        models,
        source,
        bandwidths=args.bandwidths,
        speech=args.speech,
        visqol=visqol,
        progress=not args.no_progress,
    )
    paths = write_results(result, args.output)
    for note in result.notes:
        print(f"note: {note['key']}: {note['note']}")
    print(format_table(result))
    files = len({r["key"] for r in result.per_file})
    print(f"evaluated {files} items; {paths['json']}, {paths['csv']}, {paths['plot']}")
    if result.errors:
        for error in result.errors:
            print(f"encodec-jax eval: skipped {error['key']}: {error['error']}", file=sys.stderr)
        print(
            f"encodec-jax eval: {len(result.errors)} of {files + len(result.errors)} items "
            "failed (listed in eval.json)",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.config import load_config

    overrides = {
        "init": args.init,
        "n_q": args.n_q,
        "data.train": args.data,
        "data.valid": args.valid,
        "data.segment": args.segment,
        "data.batch_size": args.batch_size,
        "data.workers": args.workers,
        "optim.lr": args.lr,
        "run.steps": args.steps,
        "run.seed": args.seed,
        "run.checkpoint_every": args.checkpoint_every,
        "run.keep": args.keep,
        "run.log_every": args.log_every,
        "run.valid_every": args.valid_every,
        "run.compute_dtype": args.compute_dtype,
    }
    config = load_config(args.config_preset, args.config, overrides)
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from .train.trainer import Trainer

    trainer = Trainer(config, args.out, progress=not args.no_progress)
    for folder in (trainer.train_folder, trainer.valid_folder):
        for path, reason in folder.skipped if folder is not None else ():
            print(f"note: skipping {os.path.join(folder.root, path)}: {reason}")
    result = trainer.run()
    shown = ", ".join(
        f"{k} {result.metrics[k]:.4g}" for k in ("l1", "msspec") if k in result.metrics
    )
    print(
        f"trained {result.step} steps in {result.seconds:.0f} s"
        + (f" ({shown})" if shown else "")
        + f"; weights in {result.export_dir}"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    kind = convert(
        args.src,
        args.out,
        to=args.to,
        force=args.force,
        preset=args.preset,
        config_file=args.config,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.local_files_only,
    )
    print(f"converted {kind} checkpoint {args.src} -> {args.out} ({args.to})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="encodec-jax", description="EnCodec neural audio codec in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser(
        "encode",
        help="encode audio files to codes (.npz, or .ecdc for the 24/48 kHz models)",
        description="Encode audio files (any format libsndfile reads; resampled and "
        "channel-converted to the model's) to codes. One input: OUT is the codes file, .npz or "
        ".ecdc by its extension. Several inputs: OUT is a directory that receives <stem>.npz "
        "(or <stem>.ecdc with --format ecdc). .ecdc is the encodec package's format and holds "
        "only codes of encodec_24khz / encodec_48khz.",
    )
    encode.add_argument("inputs", nargs="+", metavar="IN", help="audio file(s)")
    encode.add_argument("-o", "--output", required=True, metavar="OUT", help="file or directory")
    encode.add_argument("--format", choices=["npz", "ecdc"], default=None, help="codes format")
    _add_model_options(encode)
    encode.set_defaults(run=_encode)

    decode = commands.add_parser(
        "decode",
        help="decode a codes file back to audio",
        description="Decode a codes file (.npz or .ecdc) to audio at the model's sampling rate "
        "and the encoded length. The model must be the one that made the codes: by default "
        "the one the .npz file names; for .ecdc files --model is required and must have the "
        "architecture the file names (encodec_24khz or encodec_48khz).",
    )
    decode.add_argument("codes", metavar="CODES", help="codes file (.npz or .ecdc)")
    decode.add_argument("-o", "--output", required=True, metavar="OUT", help=".wav, .flac, .ogg")
    _add_model_options(decode, bandwidth=False, default="the model the .npz names")
    decode.set_defaults(run=_decode)

    reconstruct = commands.add_parser(
        "reconstruct",
        help="encode and decode an audio file",
        description="Encode an audio file and decode it again (at the model's sampling rate).",
    )
    reconstruct.add_argument("input", metavar="IN", help="audio file")
    reconstruct.add_argument("-o", "--output", required=True, metavar="OUT", help="audio file")
    _add_model_options(reconstruct)
    reconstruct.set_defaults(run=_reconstruct)

    stream = commands.add_parser(
        "stream",
        help="encode (or encode and decode) audio chunk by chunk as it arrives",
        description="Stream audio through the model as it is read: IN is an audio file, or - "
        "for raw PCM on stdin (with --rate, --channels, --pcm-format), e.g. `sox in.flac -t "
        "raw -r 24000 -e signed -b 16 -c 1 - | encodec-jax stream - --rate 24000 ...`. OUT "
        "ending in .npz (or .ecdc) receives the codes (the file encode writes); an audio file "
        "(.wav, .flac, .ogg) receives the reconstruction, written as it goes. The codes equal "
        "encode's and the audio reconstruct's; prints the real-time factor and the latency.",
    )
    stream.add_argument("input", metavar="IN", help="audio file, or - for raw PCM on stdin")
    stream.add_argument("-o", "--output", required=True, metavar="OUT", help=".npz or .wav")
    stream.add_argument(
        "--chunk-frames",
        type=_positive_int,
        default=1,
        help="frames per step (1: the lowest latency); chunked models step by their own chunks",
    )
    stream.add_argument("--rate", type=_positive_int, default=None, help="stdin PCM rate, Hz")
    stream.add_argument(
        "--channels", type=_positive_int, default=None, help="stdin PCM channels (default 1)"
    )
    stream.add_argument(
        "--pcm-format",
        choices=["s16", "f32"],
        default="s16",
        help="stdin PCM samples: little-endian 16-bit integers or float32 (default s16)",
    )
    _add_model_options(stream)
    stream.set_defaults(run=_stream)

    tokenize = commands.add_parser(
        "tokenize",
        help="encode a corpus (folder, Parquet, HF dataset, WebDataset) into Parquet shards",
        description="Encode every item of SOURCE into Parquet shards OUT/shard-NNNNN.parquet, "
        "one row per item: path (the source file), key, codes [chunks, n_q, frames], "
        "chunk_frames, audio_scales, sample_rate, num_samples, bandwidth, model, and the "
        "--keep-columns. SOURCE: a folder of audio files; Parquet files or WebDataset .tar "
        "shards (a path, glob or brace pattern such as 'shard-{000000..000099}.tar'); a "
        "save_to_disk folder; or a Hugging Face dataset id (streamed). Paths and OUT may be "
        "fsspec URLs (gs://, s3://, hf://, https://). Items that fail are listed in "
        "OUT/errors.jsonl and the exit status is 3. Run the same command again to resume an "
        "interrupted run.",
    )
    tokenize.add_argument(
        "source", metavar="SOURCE", help="folder, .parquet/.tar files, dataset folder or Hub id"
    )
    tokenize.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="directory or fsspec URL"
    )
    _add_source_options(tokenize, "SOURCE")
    tokenize.add_argument(
        "--keep-columns",
        default=None,
        metavar="A,B",
        help="columns (tar: member extensions) to copy into the output rows, e.g. text,speaker",
    )
    tokenize.add_argument(
        "--batch-size", type=_positive_int, default=8, help="items per compiled call (8)"
    )
    tokenize.add_argument(
        "--shard-size", type=_positive_int, default=1000, help="items per shard (1000)"
    )
    tokenize.add_argument(
        "--buckets",
        type=_positive_float,
        nargs="+",
        default=None,
        metavar="SECONDS",
        help="padded lengths in seconds (default: 1, 2, 4, ... 256)",
    )
    tokenize.add_argument(
        "--exact",
        action="store_true",
        help="no padding: codes equal encoding each item alone (one program per length)",
    )
    tokenize.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="threads decoding audio (min(8, CPUs))",
    )
    tokenize.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize(); each process takes its share of the shards",
    )
    tokenize.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(tokenize)
    tokenize.set_defaults(run=_tokenize)

    train = commands.add_parser(
        "train",
        help="train or fine-tune EnCodec on a folder of audio (resumable)",
        description="Train EnCodec as audiocraft does (RVQ with EMA codebooks, MS-STFT "
        "discriminator, balanced losses), from a preset (--config-preset) or from a checkpoint "
        "(--init). Every option can also come from a YAML file (--config, same fields as "
        "OUT/config.yaml); command-line options win. Run the same command again to resume.",
    )
    train.add_argument("--out", required=True, metavar="OUT", help="run folder")
    train.add_argument("--data", default=None, metavar="DIR", help="training audio folder")
    train.add_argument("--valid", default=None, metavar="DIR", help="validation audio folder")
    train.add_argument(
        "--init", default=None, metavar="MODEL", help="fine-tune this checkpoint (Hub id or dir)"
    )
    train.add_argument(
        "--config-preset",
        default=None,
        metavar="NAME",
        help="default, encodec_musicgen_32khz, encodec_base_24khz or tiny",
    )
    train.add_argument("--config", default=None, metavar="YAML", help="settings file")
    train.add_argument("--steps", type=_positive_int, default=None, help="total steps")
    train.add_argument(
        "--batch-size", type=_positive_int, default=None, help="global batch (all devices)"
    )
    train.add_argument("--segment", type=_positive_float, default=None, help="seconds per item")
    train.add_argument("--lr", type=_positive_float, default=None, help="learning rate")
    train.add_argument("--n-q", type=_positive_int, default=None, help="codebooks to train")
    train.add_argument("--seed", type=int, default=None, help="data and initialisation seed")
    train.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N")
    train.add_argument("--keep", type=_positive_int, default=None, help="checkpoints kept")
    train.add_argument("--log-every", type=_positive_int, default=None, metavar="N")
    train.add_argument("--valid-every", type=_positive_int, default=None, metavar="N")
    train.add_argument("--workers", type=int, default=None, help="data loading processes")
    train.add_argument(
        "--compute-dtype", choices=["float32", "bfloat16"], default=None, help="SEANet compute"
    )
    train.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval",
        help="measure a codec's quality per bandwidth on a corpus or a file",
        description="Encode and decode every item of DATA (what tokenize reads: a folder of "
        "audio files, .parquet or .tar shards, a saved or Hub dataset; or one audio file) with "
        "each --model at each bandwidth, as `reconstruct` does, and compare with the input at "
        "the model's rate and channels: SI-SNR, multi-scale mel and STFT distances, L1 (and "
        "with --speech, PESQ, STOI and ViSQOL at 16 kHz), codebook usage, perplexity and the "
        "entropy-coded bitrate. Writes OUT_DIR/eval.json, eval.csv (one row per model and "
        "bandwidth, means over files) and eval.png (the metrics against kbps) and prints the "
        "table. Files that fail are reported and skipped; the exit status is then 3.",
    )
    evaluate.add_argument(
        "data", metavar="DATA", help="folder, .parquet/.tar files, dataset, or one audio file"
    )
    evaluate.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder")
    evaluate.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"Hub id or local checkpoint directory; repeat to compare (default: {DEFAULT_MODEL})",
    )
    evaluate.add_argument(
        "--bandwidths",
        type=_bandwidth_list,
        default="all",
        metavar="KBPS,...|all",
        help="comma-separated kbps each model offers, or all (default: each model's own)",
    )
    evaluate.add_argument(
        "--speech", action="store_true", help="also PESQ (wide band), STOI and ViSQOL at 16 kHz"
    )
    visqol = evaluate.add_mutually_exclusive_group()
    visqol.add_argument(
        "--visqol",
        action="store_true",
        help="with --speech: ViSQOL required (default: if installed)",
    )
    visqol.add_argument(
        "--no-visqol", action="store_true", help="with --speech: no ViSQOL (faster)"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_source_options(evaluate, "DATA")
    _add_hub_options(evaluate)
    evaluate.set_defaults(run=_eval)

    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint (transformers, audiocraft, encodec .th)",
        description="Convert an EnCodec checkpoint into a directory encodec-jax loads without "
        "torch. SRC: a transformers directory or Hub id, audiocraft's "
        "compression_state_dict.bin, or an encodec package .th file.",
    )
    convert.add_argument("src", help="checkpoint file, directory or Hub id")
    convert.add_argument("out", help="output directory (must not exist unless --force)")
    convert.add_argument(
        "--to",
        choices=["encodec-jax", "transformers"],
        default="encodec-jax",
        help="output layout; both load in encodec-jax and transformers (default: encodec-jax)",
    )
    convert.add_argument("--force", action="store_true", help="replace an existing OUT")
    convert.add_argument(
        "--preset", default=None, help="architecture of a .th file: 24khz, 32khz or 48khz"
    )
    convert.add_argument("--config", default=None, help="architecture of a .th file: config.json")
    _add_hub_options(convert)
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_hub_logging()
    from .compilation import enable_compilation_cache
    from .memory import JaxAlreadyRunningError, reuse_freed_memory

    try:
        reuse_freed_memory()  # large CPU buffers stay mapped from one call to the next
    except JaxAlreadyRunningError:
        pass  # main() called in a process whose JAX already runs (tests, notebooks): left as is
    enable_compilation_cache()  # every later run of a command starts with compiled programs
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("encodec-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line for the user, never a traceback
        if os.environ.get("ENCODEC_JAX_TRACEBACK"):
            raise
        message = _first_line(err)
        print(f"encodec-jax {args.command}: error: {message}", file=sys.stderr)
        return 1


def _quiet_hub_logging() -> None:
    """huggingface_hub logs every retry of an unreachable Hub as a warning; a failure is
    reported once, as the command's one-line error, instead."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        return
    hub_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
