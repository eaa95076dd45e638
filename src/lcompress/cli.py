"""The ``lcompress`` command line. The only module that prints; every subcommand calls the library.

Exit codes: 0 success; 2 bad input (a config, a missing or unreadable file, a bad argument, code named by a config
without ``--trust-code``, a run directory another process holds); 3 the run failed (an L step or the reference's
training diverged, a write failed: disk full, read-only directory, out of memory); 130 interrupted (Ctrl-C; what was
done is kept and ``--resume`` continues). Every error is one line on stderr, and nothing the user had is overwritten:
files are replaced atomically, so each is the old one or the new one.
"""
from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130

logger = logging.getLogger("lcompress.cli")


class _Stop:
    """Ctrl-C sets a flag that the run polls between minibatches; a second Ctrl-C aborts at once."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce  # under torchrun only rank 0 says so; every rank sets its flag

    def __call__(self) -> bool:
        return self.requested

    @contextmanager
    def installed(self):
        # Installed on every rank: torchrun passes the launcher's SIGINT on to each worker, and a rank without
        # the handler would die of KeyboardInterrupt in the middle of a collective, taking the others with it.
        # The ranks agree on the stop (experiment._stop_requested), so all of them stop at the same minibatch.
        old = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            if self.announce:
                print("\nlcompress: stopping after the current minibatch (Ctrl-C again to abort)", file=sys.stderr)

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)


class _ConsoleHandler(logging.Handler):
    """Writes log lines through ``tqdm.write`` so they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


class _Discard(list):
    def append(self, item) -> None:
        pass


class _DeferredFileHandler(logging.Handler):
    """A log file that is opened only when :meth:`start` is called; records before that wait in memory (and are
    dropped if it never is), so a command that fails validation leaves the run directory exactly as it was."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.failed = False

    def start(self) -> None:
        if self.file is not None or self.failed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(self.formatter)
        self.file.handleError = self._write_failed  # type: ignore[method-assign]
        pending, self.pending = self.pending, []
        for record in pending:
            self.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        else:
            self.pending.append(record)

    def _write_failed(self, record: logging.LogRecord) -> None:
        """A log line that cannot be written (disk full): one warning, not logging's traceback per line; the
        file is given up and the run goes on (its results are written, or fail, on their own)."""
        e = sys.exc_info()[1]
        file, self.file, self.failed = self.file, None, True
        self.pending = _Discard()
        try:
            if file is not None:
                file.close()
        except OSError:
            pass
        print(f"lcompress: warning: cannot write the log file {self.path}: {e}; logging there stopped",
              file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.pending.clear()
        super().close()


def _setup_logging(
    verbose: int, quiet: bool, log_file: Path | None = None, defer: bool = False, console_level: int | None = None
) -> _DeferredFileHandler | None:
    """Console logging (through tqdm) and, with ``log_file``, a DEBUG log there: opened at once, or with ``defer``
    only when the returned handler's ``start()`` is called. ``console_level`` overrides ``verbose``/``quiet``."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if console_level is not None:
        level = console_level
    root = logging.getLogger("lcompress")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = _ConsoleHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.propagate = False
    if log_file is None:
        return None
    fh = _DeferredFileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    if not defer:
        fh.start()
    return fh


@contextmanager
def _distributed():
    """Under torchrun (RANK/WORLD_SIZE set), join the process group (nccl on CUDA, gloo otherwise) and yield
    ``(rank, world_size)``; ``(0, 1)`` otherwise.

    A group this joined is destroyed on the way out, after everything that holds it (the DDP model) is gone: a
    process whose gloo group is torn down only by the interpreter's exit can die of SIGABRT ("terminate called
    without an active exception") after finishing its work, and torchrun then reports the run as failed."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # before the group is made, so that it binds this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    except BaseException as e:
        if created:  # the failed run's frames (kept by the traceback) hold the DDP model; the traceback stays printable
            seen: set[int] = set()
            while e is not None and id(e) not in seen:
                seen.add(id(e))
                traceback.clear_frames(e.__traceback__)
                e = e.__cause__ or e.__context__
        raise
    finally:
        if created and dist.is_initialized():
            gc.collect()  # DDP sits in reference cycles: collect it while the group still exists
            dist.destroy_process_group()


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` overrides; the value is read as TOML (numbers, booleans, strings, lists)."""
    from .config import ConfigError, tomllib

    out = {}
    for it in items or []:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {it!r}: expected key=value (e.g. schedule.steps=10)")
        try:
            out[key.strip()] = tomllib.loads(f"v = {val}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = val
    return out


def _bars(args) -> bool:
    """Progress bars only on a terminal: redirected to a file, a bar's redraws fill it (one LC step, or one epoch,
    is logged as one line either way)."""
    return not args.quiet and sys.stderr.isatty()


# ---- subcommands ------------------------------------------------------------------------------------------------
def _check_train_flags(args) -> None:
    import math

    from .config import ConfigError

    checks = [
        ("--epochs", args.epochs, args.epochs >= 0, "must be >= 0"),
        ("--seed", args.seed, 0 <= args.seed < 2**63, "must be in [0, 2**63)"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "must be a finite number > 0"),
        ("--lr-decay", args.lr_decay, 0 < args.lr_decay <= 1, "must be in (0, 1]"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "must be >= 1"),
        ("--weight-decay", args.weight_decay, math.isfinite(args.weight_decay) and args.weight_decay >= 0,
         "must be a finite number >= 0"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{flag}={value!r}: {rule}")


def cmd_train(args) -> int:
    from .config import ConfigError, parse_config
    from .experiment import build_model, check_device_available, load_data
    from .training import evaluate, save_checkpoint, train_reference

    _setup_logging(args.verbose, args.quiet)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; give the checkpoint's file name (.pt)")
    _check_train_flags(args)
    check_device_available(args.device, "--device")
    model_args = _parse_set(args.model_arg)
    # a config with a placeholder task validates --model, --model-arg, --dataset, --seed and --device the way
    # `compress` does
    cfg = parse_config({"model": {"name": args.model, "args": model_args}, "data": {"dataset": args.dataset},
                        "seed": args.seed, "device": args.device,
                        "tasks": [{"params": "re:.*", "compression": {"type": "BinaryQuantization"}}]},
                       trust_code=args.trust_code)
    data = load_data(cfg, args.data_dir)
    model = build_model(cfg)  # seeded by --seed
    hist = train_reference(model, data, args.epochs, lr=args.lr, lr_decay=args.lr_decay, batch_size=args.batch_size,
                           seed=args.seed, device=args.device, progress=_bars(args), weight_decay=args.weight_decay)
    err = evaluate(model, data.x_test.to(args.device), data.y_test.to(args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, {"model": args.model, "args": model_args, "dataset": args.dataset, "epochs": args.epochs,
                                 "seed": args.seed, "lr": args.lr, "test_error": err,
                                 "train_loss": hist[-1]["loss"] if hist else None})
    print(f"{args.model} on {args.dataset}: test error {err:.2f}% after {args.epochs} epochs -> {out}")
    return 0


def _final_table(res: dict[str, Any]) -> str:
    from .demo import format_table

    rows = [
        {"model": "reference", "test_error": res["reference"]["test_error"], "ratio": 1.0},
        {"model": "direct compression", "test_error": res["direct_compression"]["test_error"],
         "ratio": res["direct_compression"]["ratio"]},
        {"model": "LC", "test_error": res["final"]["test_error"], "ratio": res["final"]["ratio"]},
    ]
    return format_table(rows, [("model", "model", "s"), ("test_error", "test error %", ".2f"), ("ratio", "ratio", ".2f")])


def cmd_compress(args) -> int:
    with _distributed() as (rank, world):
        return _compress(args, rank, world)


def _compress(args, rank: int, world: int) -> int:
    from .config import ConfigError, load_config
    from .experiment import RunInterrupted, run_compress

    overrides = _parse_set(args.set)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise ConfigError(f"--out {args.out!r}: a resumed run stays in its directory {str(run_dir)!r}")
        cfg = (load_config(args.config, overrides, trust_code=args.trust_code) if args.config
               else _saved_config(run_dir, overrides, trust_code=args.trust_code))
    else:
        if args.config is None:
            raise ConfigError("compress: a config file is needed (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides, trust_code=args.trust_code)
        run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    if rank == 0:
        log = _setup_logging(args.verbose, args.quiet, run_dir / "log.txt", defer=True)
    else:  # the other ranks run the same steps: rank 0 speaks for all, they log errors only and keep no log file
        log = _setup_logging(args.verbose, args.quiet, console_level=logging.ERROR)
    stop = _Stop(announce=rank == 0)
    try:
        with stop.installed():
            res = run_compress(cfg, run_dir, resume=bool(args.resume), force=args.force, data_dir=args.data_dir,
                               progress=_bars(args) and rank == 0, should_stop=stop,
                               on_ready=log.start if log is not None else None)
    except RunInterrupted as e:
        if rank == 0:
            print(f"lcompress: interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        print(_final_table(res))
        print(f"run directory: {run_dir}")
    return 0


def _saved_config(run_dir: Path, overrides: dict[str, Any] | None = None, trust_code: bool = False):
    """The config a run directory was started with (its ``config.json``), with ``--set`` overrides applied. Code
    it names is imported only with ``--trust-code`` given again (or as an installed entry point): a run directory
    is a file like any other, and may come from someone else."""
    from .config import ConfigError, load_config

    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(run_dir)!r}: not a run directory (no config.json there)")
    return load_config(cfg_file, overrides, trust_code=trust_code)


def cmd_sweep(args) -> int:
    from .config import load_config
    from .sweep import run_sweep
    from .demo import format_table

    base = load_config(args.config, _parse_set(args.set), trust_code=args.trust_code)
    out = Path(args.out) if args.out else Path("runs") / f"sweep_{base.name}"
    log = _setup_logging(args.verbose, args.quiet, out / "log.txt", defer=True)
    values = [_parse_set([f"v={v}"])["v"] for v in args.values]
    stop = _Stop()
    with stop.installed():
        rows = run_sweep(args.config, args.vary, values, out, overrides=_parse_set(args.set),
                         baselines=args.baselines.split(",") if args.baselines else None,
                         data_dir=args.data_dir, progress=_bars(args), should_stop=stop, on_ready=log.start,
                         trust_code=args.trust_code)
    print(format_table(rows, [("value", args.vary, "s"), ("method", "method", "s"), ("test_error", "test error %", ".2f"),
                              ("ratio", "ratio", ".2f")]))
    print(f"CSV: {out / 'sweep.csv'}  plot: {out / 'sweep.png'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import SCHEMES, format_table, run_demo

    out = Path(args.out)
    schemes = args.schemes.split(",") if args.schemes else None
    for s in schemes or []:
        if s not in SCHEMES:
            from .config import ConfigError

            raise ConfigError(f"--schemes: unknown scheme {s!r} (known: {', '.join(SCHEMES)})")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        from .config import ConfigError

        raise ConfigError(f"--out {str(out)!r} is not empty; pass --overwrite to replace the demo runs there")
    from ._rundir import DirectoryLock

    out.mkdir(parents=True, exist_ok=True)
    # one demo per directory: --overwrite must not delete the runs of a demo still going on there
    with DirectoryLock(out, "demo directory", hint="or give another --out"):
        if args.overwrite:
            import shutil

            for name in SCHEMES:
                shutil.rmtree(out / name, ignore_errors=True)
                shutil.rmtree(out / f"{name}_peer", ignore_errors=True)
        _setup_logging(args.verbose, args.quiet, out / "log.txt")
        stop = _Stop()
        try:
            with stop.installed():
                rows = run_demo(out, args.reference, schemes=schemes, steps=args.steps, data_dir=args.data_dir,
                                progress=_bars(args), should_stop=stop, peers=not args.no_peers)
        except Exception as e:
            from .experiment import RunInterrupted

            if isinstance(e, RunInterrupted):
                print(f"lcompress: interrupted: {e}", file=sys.stderr)
                return EXIT_INTERRUPTED
            raise
    print()
    print(f"LeNet300 on Fashion-MNIST, reference test error {rows[0]['reference_error']:.2f}%")
    print(format_table(rows, [("scheme", "scheme", "s"), ("description", "description", "s"),
                              ("test_error", "LC error %", ".2f"), ("peer_error", "best peer %", ".2f"),
                              ("peer", "peer", "s"), ("dc_error", "DC error %", ".2f"),
                              ("ratio", "ratio", ".1f"), ("file_bytes", "file bytes", "d"),
                              ("seconds", "seconds", ".0f")]))
    print(f"\nplot: {out / 'tradeoff.png'}  table: {out / 'summary.csv'}  runs: {out}/<scheme>/")
    return 0


def cmd_export(args) -> int:
    from ._rundir import DirectoryLock

    _setup_logging(args.verbose, args.quiet)
    run = Path(args.run_dir)
    fmt = getattr(args, "format", "lcz")
    # an ``lcompress ptq`` run directory holds model.lcz and results.json, and no config.json
    ptq_run = not (run / "config.json").is_file() and (run / "results.json").is_file()
    if not ptq_run and not (run / "config.json").is_file():
        from .config import ConfigError

        raise ConfigError(f"{str(run)!r} is not a finished run directory: config.json is missing")
    if not ptq_run and fmt == "gguf":
        from .config import ConfigError

        raise ConfigError(f"--format {fmt}: {str(run)!r} is not an lcompress ptq run (model.lcz and results.json); "
                          "GGUF export writes the Llama models that lcompress ptq compresses")
    if ptq_run and fmt == "onnx":
        from .config import ConfigError

        raise ConfigError(f"--format onnx: {str(run)!r} is an lcompress ptq run; lcompress export writes ONNX for "
                          "compress runs (in Python: lcompress.formats.onnx.export_onnx(RUN/model.lcz, ...))")
    # the run's files must not change under the export (a compress --resume there): one process per run directory
    lock = DirectoryLock(run, "run directory")
    try:
        lock.acquire()
    except OSError as e:
        if not args.out or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # a run directory this user cannot write to (someone else's, a read-only mount) can still be read
        logger.warning("cannot lock %s (%s): exporting it without the lock", run, e.strerror)
    try:
        return _export_ptq_run(args, run) if ptq_run else _export_run(args, run)
    finally:
        lock.release()


def _export_ptq_run(args, run: Path) -> int:
    """``lcompress export`` of a ``ptq`` run: its model.lcz as it is (``--format lcz``) or as a GGUF file."""
    import json

    from .config import ConfigError
    from .export import CorruptFileError

    lcz = run / "model.lcz"
    if not lcz.is_file():
        raise ConfigError(f"{str(run)!r} is not a finished post-training run: model.lcz is missing")
    if getattr(args, "format", "lcz") == "lcz":
        if not args.out or Path(args.out).resolve() == lcz.resolve():
            print(f"{lcz}: {lcz.stat().st_size} bytes (written by lcompress ptq)")
            return 0
        from ._io import atomic_write

        atomic_write(Path(args.out), lambda f: f.write(lcz.read_bytes()))
        print(f"wrote {args.out}: {Path(args.out).stat().st_size} bytes (a copy of {lcz})")
        return 0
    from .formats.gguf import GGUFExportError, export_gguf

    if not args.out:
        raise ConfigError("--format gguf needs --out FILE.gguf")
    source = args.source
    if source is None:
        try:
            source = json.loads((run / "results.json").read_text(encoding="utf-8"))["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{run / 'results.json'}: no source model path in it ({_one_line(e)}); pass "
                              "--source") from None
        if not Path(source).exists():
            raise ConfigError(f"the source model {source!r} named in {run / 'results.json'} is not there; pass "
                              "--source (the GGUF file or Hugging Face directory that was compressed)")
    try:
        s = export_gguf(lcz, source, args.out, allow_float=args.allow_float)
    except (GGUFExportError, CorruptFileError) as e:
        raise ConfigError(_one_line(e)) from None
    types = ", ".join(f"{n} {k}" for k, n in sorted(s["types"].items()))
    print(f"wrote {s['path']}: {s['file_bytes']} bytes, {len(s['tensors'])} tensors ({types}); {s['compressed']} "
          "written from the compressed model's blocks as they are")
    return 0


def _export_run(args, run: Path) -> int:
    import torch

    from .algorithm import LC
    from .config import ConfigError
    from .experiment import build_model, reference_path

    for f in ("config.json", "lc_state.pt"):
        if not (run / f).is_file():
            raise ConfigError(f"{str(run)!r} is not a finished run directory: {f} is missing")
    cfg = _saved_config(run, trust_code=args.trust_code)
    model = build_model(cfg)
    # the weights Θ does not cover (biases, BatchNorm, uncompressed layers) are the run's last L step's, kept in
    # checkpoint.pt; without it the reference's are the best there is
    ckpt = run / "checkpoint.pt"
    if ckpt.is_file():
        ck = _torch_file(ckpt)
        try:
            model.load_state_dict(ck["model"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ConfigError(f"{ckpt}: its model does not fit the run's config ({_one_line(e)})") from None
    elif (ref := reference_path(cfg, run)) is not None and ref.is_file():  # (run/reference.pt if none is named)
        from .training import load_checkpoint

        logger.warning("%s is missing: the uncompressed weights in the file are the reference's", ckpt)
        try:
            load_checkpoint(ref, model)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"reference.checkpoint={str(ref)!r}: {_one_line(e)}") from None
    else:
        raise ConfigError(f"{str(run)!r}: neither checkpoint.pt nor the reference checkpoint "
                          f"{str(ref) if ref is not None else None!r} is there to take the uncompressed weights from")
    state = _torch_file(run / "lc_state.pt")
    alg = LC(model, cfg.task_map(), multipliers=cfg.lc.multipliers)
    try:
        alg.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{run / 'lc_state.pt'}: not the LC state of this run's config ({_one_line(e)})") from None
    if getattr(args, "format", "lcz") == "onnx":
        return _export_onnx(args, run, cfg, alg)
    out = Path(args.out) if args.out else run / "model.lcz"
    alg.export(out)
    rep = alg.size_report()
    print(f"wrote {out}: {out.stat().st_size} bytes (size report {rep['compressed_bits'] / 8:.0f} bytes, "
          f"ratio {rep['ratio']:.2f} for the whole model, {rep['scopes']['compressed']['ratio']:.2f} for the "
          "compressed parameters alone)")
    return 0


def _export_onnx(args, run: Path, cfg, alg) -> int:
    """``lcompress export RUN --format onnx``: the run's compact model as an ONNX file (lcompress.formats.onnx),
    traced on two inputs of ``--input-shape`` (default: the shape of the run's data) with a dynamic batch."""
    import torch

    from .config import ConfigError
    from .formats.onnx import ONNXExportError, export_onnx

    if not args.out:
        raise ConfigError("--format onnx needs --out FILE.onnx")
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise ConfigError(f"--input-shape {args.input_shape!r} must be positive integers separated by commas "
                              "(one example's shape, without the batch: 1,28,28)")
    else:
        from .experiment import load_data

        try:
            shape = tuple(load_data(cfg, trust_code=args.trust_code).x_test.shape[1:])
        except ConfigError as e:
            raise ConfigError(f"--format onnx: the run's data gives the input shape, and {_one_line(e)}; or pass "
                              "--input-shape") from None
    dtype = next((p.dtype for p in alg.model.parameters() if p.is_floating_point()), torch.float32)
    example = torch.zeros((2, *shape), dtype=dtype)
    try:
        s = export_onnx(alg, args.out, (example,), dynamic_shapes=({0: "batch"},), allow_float=args.allow_float)
    except ONNXExportError as e:
        raise ConfigError(_one_line(e)) from None
    rep = alg.size_report()
    print(f"wrote {s['path']}: {s['file_bytes']} bytes ({len(s['matmul_nbits'])} MatMulNBits layers, "
          f"{len(s['compact'])} other compact layers, {len(s['float'])} compressed weights as float; size report "
          f"{rep['compressed_bits'] / 8:.0f} bytes)")
    return 0


def _torch_file(path: Path) -> dict:
    """A run directory's torch file (weights only) as a dict; ConfigError naming it if it is anything else."""
    import torch

    from .config import ConfigError

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable torch file ({type(e).__name__}: {_one_line(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def cmd_inspect(args) -> int:
    from .demo import format_table
    from .export import CorruptFileError, inspect

    _setup_logging(args.verbose, args.quiet)
    try:
        info = inspect(args.file)
    except (CorruptFileError, OSError) as e:  # a bad file is bad input: one line naming the file, no traceback
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if args.file not in message:
            message = f"{args.file}: {message}"
        print(f"lcompress: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = info["tasks"] if isinstance(info, dict) else info
    if isinstance(info, dict):
        for k, v in info.items():
            if k != "tasks" and not isinstance(v, (dict, list)):
                print(f"{k}: {v}")
    cols = [(k, k, ".2f" if isinstance(rows[0].get(k), float) else "") for k in rows[0]] if rows else []
    print(format_table([{k: (str(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in r.items()} for r in rows], cols))
    _print_compact_layers(args.file)
    return 0


#: ``inspect`` decodes the tasks' Θ to say which compact layer each gets only up to this many bytes
INSPECT_DECODE_LIMIT = 2 << 30


def _print_compact_layers(file: str) -> None:
    """Per compressed weight, what ``lc.load(..., compact=True)`` builds and why (a layer pruned to 10% stays a
    plain nn.Linear: the sparse/dense crossover is a density of 0.1)."""
    from .demo import format_table
    from .export import CorruptFileError, compact_layers

    try:
        layers = compact_layers(file, max_bytes=INSPECT_DECODE_LIMIT)
    except CorruptFileError as e:  # the file passed inspect's checks: here, most likely too large to decode
        print(f"\ncompact layers: not shown ({_one_line(e)})")
        return
    print("\ncompact layers (what lc.load(..., compact=True) builds; a 2-D weight is taken as an nn.Linear's, "
          "a 4-D one as an nn.Conv2d's):")
    print(format_table([{**r, "shape": str(tuple(r["shape"]))} for r in layers],
                       [("parameter", "parameter", "s"), ("shape", "shape", "s"), ("layer", "layer", "s"),
                        ("why", "why", "s")]))


def cmd_peer(args) -> int:
    from .config import ConfigError, load_config
    from .experiment import RunInterrupted
    from .peers import run_peer

    overrides = _parse_set(args.set)
    if args.method:
        overrides["peer.method"] = args.method
    if args.lr is not None:
        overrides["peer.lr"] = args.lr
    cfg = load_config(args.config, overrides, trust_code=args.trust_code)
    if not cfg.peer.method:
        raise ConfigError(f"peer.method: {args.config!r} names no peer; add a [peer] table or pass --method")
    run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.name}_peer"
    _setup_logging(args.verbose, args.quiet, run_dir / "log.txt")
    stop = _Stop()
    try:
        with stop.installed():
            res = run_peer(cfg, run_dir, data_dir=args.data_dir, overwrite=args.overwrite, progress=_bars(args),
                           should_stop=stop)
    except RunInterrupted as e:
        print(f"lcompress: interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    f = res["final"]
    print(f"{res['method']} (lr {res['lr']:g}, {res['epochs']} epochs): test error {f['test_error']:.2f}% "
          f"(reference {res['reference']['test_error']:.2f}%), ratio {f['ratio']:.1f}, file {f['file_bytes']} bytes")
    print(f"run directory: {run_dir}")
    return 0


def cmd_ptq(args) -> int:
    from .ptq_run import run_ptq

    out = Path(args.out)
    log = _setup_logging(args.verbose, args.quiet, out / "log.txt", defer=True)
    solver_args = {} if args.steps is None else {"steps": args.steps}
    try:
        res = run_ptq(args.model, args.calib, out, scheme=args.scheme, config=args.config, method=args.method,
                      eval_text=args.eval, calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
                      eval_tokens=args.eval_tokens, solver_args=solver_args, overwrite=args.overwrite,
                      float_eval=not args.no_float_eval, damp=args.damp, batch_size=args.batch_size, target=args.target,
                      trust_code=args.trust_code, progress=not args.quiet, on_ready=log.start)
    except KeyboardInterrupt:
        print(f"lcompress: interrupted; run the same command again to resume from the last finished block "
              f"({out / 'ckpt'})", file=sys.stderr)
        return EXIT_INTERRUPTED
    sz = res["sizes"]
    line = (f"{res['method']} {res['scheme'] or res['config']}: {sz['bits_per_weight']:.3f} bits/weight over "
            f"{sz['compressed_weights']} weights, file {sz['file_bytes']} bytes, {res['compress_seconds']:.0f} s")
    if "compressed" in res:
        ppl = res["compressed"]["perplexity"]
        base = f" (float {res['float']['perplexity']:.2f})" if "float" in res else ""
        line += f"; perplexity {ppl:.2f}{base}"
    print(line)
    print(f"run directory: {out}")
    return 0


def cmd_ptq_demo(args) -> int:
    from .demo import format_table
    from .ptq_run import run_ptq_demo

    out = Path(args.out)
    _setup_logging(args.verbose, args.quiet)
    rows = run_ptq_demo(args.texts, out, schemes=tuple(args.schemes.split(",")), methods=tuple(args.methods.split(",")),
                        calib_samples=args.calib_samples, eval_tokens=args.eval_tokens, overwrite=args.overwrite,
                        progress=not args.quiet)
    base = rows[0]["perplexity"] if rows and rows[0]["method"] == "float" else None
    for r in rows:
        r["increase"] = None if base is None or r["method"] == "float" else r["perplexity"] - base
    print(format_table(rows, [("method", "method", "s"), ("scheme", "scheme", "s"), ("perplexity", "perplexity", ".2f"),
                              ("increase", "over float", ".2f"), ("bits_per_weight", "bits/weight", ".3f"),
                              ("seconds", "seconds", ".0f")]))
    print(f"runs in {out}")
    return 0


# ---- entry point ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcompress", description="Compress neural networks by the Learning-Compression algorithm.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("-v", "--verbose", action="count", default=1, help="more log output")
        sp.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")

    def trust(sp):
        sp.add_argument("--trust-code", action="store_true",
                        help="import and run the model/dataset function a config names as 'package.module:function' "
                             "(without it, only built-in names and installed entry points are used); only for "
                             "configs and run directories you trust")

    t = sub.add_parser("train", help="train a reference model")
    t.add_argument("--model", required=True)
    t.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model constructor argument")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--data-dir")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--lr-decay", type=float, default=0.95, help="per-epoch learning-rate factor")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", required=True, help="checkpoint path (.pt)")
    t.add_argument("--overwrite", action="store_true")
    trust(t)
    common(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compress", help="run LC from a TOML config")
    c.add_argument("config", nargs="?", help="the run's TOML config (see examples/)")
    c.add_argument("--out", help="run directory (default runs/<name>)")
    c.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    c.add_argument("--force", action="store_true", help="resume even if the config changed")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. schedule.steps=10")
    c.add_argument("--data-dir")
    trust(c)
    common(c)
    c.set_defaults(func=cmd_compress)

    pe = sub.add_parser("peer", help="run the config's peer method (STE-QAT, GMP, ...) at the same budget as LC")
    pe.add_argument("config", help="a run's TOML config with a [peer] table (or --method)")
    pe.add_argument("--method", help="override peer.method (ste_codebook, scaled_sign_ste, gmp, oneshot_prune, "
                                     "ste_codebook_gmp)")
    pe.add_argument("--lr", type=float, help="override peer.lr")
    pe.add_argument("--out", help="run directory (default runs/<name>_peer)")
    pe.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    pe.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    pe.add_argument("--data-dir")
    trust(pe)
    common(pe)
    pe.set_defaults(func=cmd_peer)

    s = sub.add_parser("sweep", help="error-compression trade-off over a list of settings")
    s.add_argument("config")
    s.add_argument("--vary", required=True, metavar="KEY", help="dotted config key, e.g. tasks.0.compression.k")
    s.add_argument("--values", required=True, nargs="+", help="values of KEY, e.g. 2 4 8 16")
    s.add_argument("--baselines", help="comma list: dc (default), retrain (magnitude pruning + retraining)")
    s.add_argument("--out")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--data-dir")
    trust(s)
    common(s)
    s.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="LeNet300 on Fashion-MNIST under the paper's schemes")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--reference", default="runs/reference/lenet300.pt", help="cached reference (trained if missing)")
    d.add_argument("--schemes", help="comma list of schemes (default: all)")
    d.add_argument("--steps", type=int, help="LC steps per scheme (default 30)")
    d.add_argument("--data-dir")
    d.add_argument("--overwrite", action="store_true", help="replace earlier demo runs in --out")
    d.add_argument("--no-peers", action="store_true", help="skip the best peer beside each scheme (halves the time)")
    common(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("export", help="write the compact .lcz file of a finished run (or a ptq run as GGUF)")
    e.add_argument("run_dir")
    e.add_argument("--out")
    e.add_argument("--format", default="lcz", choices=["lcz", "gguf", "onnx"],
                   help="lcz (default); gguf: a ptq run of a Llama model as a GGUF file for llama.cpp; onnx: a "
                        "compress run for ONNX Runtime (grouped integers as MatMulNBits)")
    e.add_argument("--input-shape", help="onnx: one input's shape without the batch, e.g. 1,28,28 (default: the "
                   "run's data)")
    e.add_argument("--source", help="gguf: the model that was compressed (default: results.json's)")
    e.add_argument("--allow-float", action="store_true",
                   help="gguf/onnx: write a weight whose compression has no GGUF block type (ONNX form) as float "
                        "(else refused)")
    trust(e)
    common(e)
    e.set_defaults(func=cmd_export)

    q = sub.add_parser("ptq", help="post-training compression of a Hugging Face causal LM from a calibration text")
    q.add_argument("--model", required=True, help="a Hugging Face checkpoint directory or a .gguf file")
    q.add_argument("--calib", required=True, metavar="FILE.txt", help="calibration text (UTF-8)")
    q.add_argument("--scheme", help="int4-g64, int3-g64, int2-g64 (int<bits>-g<group>[-asym]), sparse50, 2:4, 4:8, "
                                    "q8_0, q4_0, q4_1, q5_0, q5_1: every linear layer of the transformer blocks")
    q.add_argument("--config", help="a TOML config with [[tasks]] (and [solver]) instead of --scheme")
    q.add_argument("--method", default="lc", help="lc (default), rtn, gptq, sparsegpt, wanda, magnitude")
    q.add_argument("--eval", metavar="FILE.txt", help="held-out text: perplexity of the float and compressed models")
    q.add_argument("--out", required=True, help="run directory (a killed run resumes when started again)")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    q.add_argument("--eval-tokens", type=int, default=40960, help="evaluation tokens (default 40960)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    q.add_argument("--steps", type=int, help="LC steps per layer (default 30)")
    q.add_argument("--damp", type=float, default=0.01, help="dampening of H, relative to its mean diagonal")
    q.add_argument("--target", default="own", choices=["own", "float"],
                   help="each layer reproduces its own float outputs (own, as GPTQ) or the float model's (float)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    q.add_argument("--no-float-eval", action="store_true", help="skip the float model's perplexity")
    q.add_argument("--overwrite", action="store_true", help="replace a finished run (or a checkpoint) in --out")
    trust(q)
    common(q)
    q.set_defaults(func=cmd_ptq)

    qd = sub.add_parser("ptq-demo", help="SmolLM2-135M post-training: LC beside RTN and GPTQ, a perplexity table")
    qd.add_argument("--texts", default="data/texts", help="calib.txt and eval.txt (scripts/build_texts.py)")
    qd.add_argument("--out", default="runs/ptq-demo")
    qd.add_argument("--schemes", default="int3-g64", help="comma list (default int3-g64)")
    qd.add_argument("--methods", default="rtn,gptq,lc", help="comma list (default rtn,gptq,lc)")
    qd.add_argument("--calib-samples", type=int, default=128)
    qd.add_argument("--eval-tokens", type=int, default=40960)
    qd.add_argument("--overwrite", action="store_true", help="rerun finished runs")
    common(qd)
    qd.set_defaults(func=cmd_ptq_demo)

    i = sub.add_parser("inspect", help="per-task table of a .lcz file")
    i.add_argument("file")
    common(i)
    i.set_defaults(func=cmd_inspect)
    return p


def _version() -> str:
    from . import __version__

    return f"lcompress {__version__}"


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lcompress: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FloatingPointError, OSError, MemoryError) as e:  # the input was fine, the run failed
        print(f"lcompress: error: {_runtime_message(e)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("lcompress: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from .experiment import RunInterrupted

        if isinstance(e, RunInterrupted):  # e.g. a sweep stopped by Ctrl-C: rerunning it continues
            print(f"lcompress: interrupted: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if _is_out_of_memory(e):
            print(f"lcompress: error: {_runtime_message(e)}", file=sys.stderr)
            return EXIT_RUN_FAILED
        raise  # anything else is a bug: its traceback is what a report needs


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


def _runtime_message(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{_one_line(e)}; the files that were there are kept as they were"
    if isinstance(e, FloatingPointError):
        return f"{_one_line(e)}; nothing was written for that step"
    return f"{type(e).__name__}: {_one_line(e)}"


if __name__ == "__main__":
    sys.exit(main())
