"""The ``softserve`` command: relabel, transcode, inspect, verify and report on label sets,
serve them, train students on them, and run the demo."""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from inspect import Parameter, Signature
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from softserve.errors import InputError, Interrupted, SoftserveError
from softserve.format.codecs import STUDY_VERDICTS

if TYPE_CHECKING:
    from softserve.format.augment import DsaPolicy, MixPolicy, ViewPolicy
    from softserve.service.settings import ServiceSettings
    from softserve.worker.demo import DemoOptions

#: The default codec as --help states it (softserve.format.codecs.default_codec).
_DEFAULT_CODECS = (
    "by class count: the label budget's verdict at the nearest K measured ("
    + ", ".join(f"{codec} at K = {k}" for k, codec in sorted(STUDY_VERDICTS.items()))
    + "), fp16 for 8 classes or fewer"
)

app = typer.Typer(
    name="softserve",
    help=(
        "Precomputed soft labels for dataset distillation.\n\n"
        "Run a teacher once over a synthetic image set for many epochs of augmented views "
        "(relabel), then serve the labels to every student run."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
demo_app = typer.Typer(
    help="The Fashion-MNIST demo: a real teacher, a synthetic set (IPC 10 by default), its "
    "label set.",
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")


def _print_version(value: bool) -> None:
    if value:
        from softserve import __version__

        print(f"softserve {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    pass

err = Console(stderr=True)
stdout = Console()


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--size takes N or HxW, got {text!r}") from None
    if len(values) not in (1, 2):
        raise InputError(f"--size takes N or HxW, got {text!r}")
    return (values[0], values[-1])


def _flag(name: str, default: object) -> str:
    """How a user turns option ``name`` away from its default: ``--no-flip`` for a flag on
    by default, ``--weights`` otherwise."""
    option = name.replace("_", "-")
    return f"--no-{option}" if default is True else f"--{option}"


def _interrupted(what: str) -> NoReturn:
    raise Interrupted(what)


TeacherOption = Annotated[
    str,
    typer.Option(
        help="torchvision:ARCH, timm:ARCH, module.path:callable, or a torch.export .pt2 file."
    ),
]
ImagesOption = Annotated[
    Path, typer.Option(help="ImageFolder tree (ROOT/CLASS/IMG.png) or a .pt {data, label}.")
]
ViewsOption = Annotated[
    str,
    typer.Option(
        help="rrc: RandomResizedCrop + flip (--min-scale .. --flip); dsa: the GIFT "
        "evaluator's DSA views (flip, brightness, saturation, contrast, then one of crop, "
        "scale, rotate, then cutout), drawn per (epoch, sample)."
    ),
]


@dataclass(frozen=True)
class _TeacherOptions:
    """The teacher, view and GIFT options ``relabel`` and ``train --teacher`` share, as
    typed on the command line."""

    weights: Annotated[
        Path | None,
        typer.Option(help="State dict to load (plain, or under 'state_dict'/'model')."),
    ] = None
    num_classes: Annotated[
        int | None, typer.Option(help="Classes (torchvision teachers; tensor files).")
    ] = None
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean in [0,1] units, e.g. 0.485,0.456,0.406.")
    ] = None
    std: Annotated[str | None, typer.Option(help="Per-channel std, like --mean.")] = None
    size: Annotated[
        str | None, typer.Option(help="Output view size N or HxW [default: base size].")
    ] = None
    min_scale: Annotated[float, typer.Option(help="Smallest crop area fraction.")] = 0.08
    max_scale: Annotated[float, typer.Option(help="Largest crop area fraction.")] = 1.0
    min_ratio: Annotated[
        float, typer.Option(help="Smallest crop aspect ratio [default: 3/4].", show_default=False)
    ] = 3 / 4
    max_ratio: Annotated[
        float, typer.Option(help="Largest crop aspect ratio [default: 4/3].", show_default=False)
    ] = 4 / 3
    flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True
    views: ViewsOption = "rrc"
    alpha: Annotated[float, typer.Option(help="GIFT label smoothing α.")] = 0.1
    beta: Annotated[float, typer.Option(help="GIFT weight β of the smoothed label.")] = 0.1
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="Trust a .pt2 teacher: torch may unpickle and run code from it; trusted "
            "files only."
        ),
    ] = False
    random_teacher: Annotated[
        bool,
        typer.Option(
            help="Accept a torchvision teacher without --weights: random labels, for tests only."
        ),
    ] = False

    def inputs(self) -> dict[str, Any]:
        """These options as ``TeacherInputs`` fields, checked and parsed."""
        crops = _policy(self.min_scale, self.max_scale, self.min_ratio, self.max_ratio, self.flip)
        return {
            "weights": self.weights, "num_classes": self.num_classes,
            "mean": _floats(self.mean, "--mean"), "std": _floats(self.std, "--std"),
            "size": _size(self.size), "policy": crops, "dsa": _dsa(self.views, crops),
            "alpha": self.alpha, "beta": self.beta, "allow_pickle": self.allow_pickle,
            "random_teacher": self.random_teacher,
        }  # fmt: skip


def _with_teacher_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the shared teacher options (:class:`_TeacherOptions`, declared once)
    as options of its own, before its last one (``--progress``); it receives them as one
    ``teacher_options`` argument."""
    own = [p for p in Signature.from_callable(command).parameters.values()
           if p.name != "teacher_options"]  # fmt: skip
    hints = typing.get_type_hints(_TeacherOptions, include_extras=True)
    shared = [
        Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(_TeacherOptions)
    ]  # fmt: skip
    names = [p.name for p in shared]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        options = _TeacherOptions(**{name: kwargs.pop(name) for name in names})
        command(**kwargs, teacher_options=options)

    own_hints = typing.get_type_hints(command, include_extras=True)
    keyword = [p.replace(kind=Parameter.KEYWORD_ONLY, annotation=own_hints[p.name]) for p in own]
    wrapper.__annotations__ = {p.name: p.annotation for p in [*keyword, *shared]}
    wrapper.__signature__ = Signature([*keyword[:-1], *shared, keyword[-1]])  # type: ignore[attr-defined]
    return wrapper


DeviceOption = Annotated[
    str, typer.Option(help="auto, cpu, cuda (under torchrun: each rank's own GPU) or cuda:N.")
]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]


def _policy(
    min_scale: float, max_scale: float, min_ratio: float, max_ratio: float, flip: bool
) -> ViewPolicy:
    from softserve.format.augment import ViewPolicy

    try:
        return ViewPolicy(scale=(min_scale, max_scale), ratio=(min_ratio, max_ratio), flip=flip)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _dsa(views: str, crops: ViewPolicy) -> DsaPolicy | None:
    """The DSA policy of ``--views dsa``, None for crops; crop options with DSA are refused
    (DSA has no crop box to shape)."""
    from softserve.format.augment import VIEW_KINDS, DsaPolicy, ViewPolicy

    if views not in VIEW_KINDS:
        raise InputError(f"--views must be one of {', '.join(VIEW_KINDS)}, got {views!r}")
    if views == "rrc":
        return None
    if crops != ViewPolicy():
        raise InputError(
            "--min-scale, --max-scale, --min-ratio, --max-ratio and --no-flip shape crop views; "
            "--views dsa draws the DSA views of the GIFT evaluator: drop them"
        )
    return DsaPolicy()


def _mix(kind: str | None, prob: float, alpha: float) -> MixPolicy | None:
    from softserve.format.augment import MixPolicy

    if kind is None:
        return None
    try:
        return MixPolicy(kind=kind, prob=prob, alpha=alpha)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InputError(
            f"{exc}; pass --mix cutmix|mixup, --mix-prob in [0, 1] and --mix-alpha > 0"
        ) from None


@app.command()
@_with_teacher_options
def relabel(
    images: ImagesOption,
    teacher: TeacherOption,
    out: Annotated[Path, typer.Option(help="Label set directory to write: STORE/NAME.")],
    epochs: Annotated[int, typer.Option(help="Epochs of views to label.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the orders and views.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Teacher batch size.")] = 256,
    device: DeviceOption = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or bf16/fp16 autocast on CUDA.")] = "fp32",
    codec: Annotated[
        str | None,
        typer.Option(
            help="Label codec: fp32, fp16, int8, topk:k (k largest) or topk:k+intb (and the "
            f"rest at b bits) [default: {_DEFAULT_CODECS}].",
            show_default=False,
        ),
    ] = None,
    shard_epochs: Annotated[
        int | None, typer.Option(help="Epochs per shard [default: 16+ shards of 4-256 MiB].")
    ] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            help="cutmix or mixup: mix each (epoch, sample) with a partner drawn from the whole "
            "set, seen through its own view; the teacher labels the mixed image [default: none]."
        ),
    ] = None,
    mix_prob: Annotated[
        float, typer.Option(help="Probability that a sample is mixed (with --mix).")
    ] = 1.0,
    mix_alpha: Annotated[
        float, typer.Option(help="λ ~ Beta(α, α) of the mix (with --mix); α > 0.")
    ] = 1.0,
    progress: ProgressOption = True,
    *,
    teacher_options: _TeacherOptions,
) -> None:
    """Label a synthetic image set with a teacher: E epochs of views, logits and GIFT labels.

    Writes STORE/NAME/{dataset.h5, labels-*.h5, manifest.json}. Deterministic for a given
    seed, batch size and device; rerun the same command after an interruption to resume
    (another --batch-size or device is refused). Under torchrun, ranks split the shards.
    """
    from softserve.worker.relabel import RelabelOptions
    from softserve.worker.relabel import relabel as run_relabel

    mixing = _mix(mix, mix_prob, mix_alpha)
    opts = RelabelOptions(
        images=images,
        teacher=teacher,
        out=out,
        **teacher_options.inputs(),
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        device=device,
        precision=precision,
        codec=codec,
        shard_epochs=shard_epochs,
        mix=mixing,
        progress=progress,
    )
    try:
        result = run_relabel(opts)
    except KeyboardInterrupt:
        _interrupted(f"complete shards in {out} are kept; rerun the same command to resume")
    if result.manifest is None:
        return
    if result.computed_shards == 0:
        stdout.print(f"{out} is already complete; nothing to do")
    else:
        reused = f", {result.reused_shards} reused" if result.reused_shards else ""
        stdout.print(f"wrote {out}: {result.computed_shards} shards computed{reused}")


@app.command()
def transcode(
    source: Annotated[Path, typer.Argument(help="Label set to read: STORE/NAME.")],
    out: Annotated[Path, typer.Option(help="Label set directory to write: STORE/NEW-NAME.")],
    codec: Annotated[
        str | None,
        typer.Option(help="Codec of the new set: fp32, fp16, int8, topk:k [default: same]."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Keep the first E' stored epochs [default: all].")
    ] = None,
    shard_epochs: Annotated[
        int | None, typer.Option(help="Epochs per shard [default: as relabel picks].")
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Write a new label set from an existing one's stored labels: no teacher, no GPU.

    Same dataset, orders, views and norms; labels re-encoded in --codec, and only the first
    --epochs epochs if given. From an fp32 set, the result has the same label bytes as a
    relabel with that codec. Resumable: rerun the same command after an interruption.
    """
    from softserve.worker.transcode import TranscodeOptions
    from softserve.worker.transcode import transcode as run_transcode

    opts = TranscodeOptions(
        source=source, out=out, codec=codec, epochs=epochs, shard_epochs=shard_epochs,
        progress=progress,
    )  # fmt: skip
    try:
        manifest = run_transcode(opts)
    except KeyboardInterrupt:
        _interrupted(f"complete shards in {out} are kept; rerun the same command to resume")
    size = manifest.label_bytes()
    per_view = size / (manifest.config.epochs * manifest.config.num_samples)
    stdout.print(
        f"wrote {out}: {manifest.config.codec}, {manifest.config.epochs} epochs, "
        f"{size / 2**20:.2f} MiB of labels ({per_view:.1f} bytes per view)"
    )


import_app = typer.Typer(
    help="Import soft labels another method's relabel wrote, as a label set.",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")


@import_app.command("sre2l")
def import_sre2l(
    labels: Annotated[
        Path,
        typer.Argument(
            help="The relabel's folder (its --fkd-path): epoch_E/batch_B.tar, or LPQLD's "
            "batch_N.tar."
        ),
    ],
    images: Annotated[Path, typer.Option(help="The ImageFolder tree the relabel read.")],
    out: Annotated[Path, typer.Option(help="Label set directory to write: STORE/NAME.")],
    seed: Annotated[int, typer.Option(help="Seed of the relabel's sampler (its --fkd-seed).")] = 42,
    size: Annotated[
        str | None,
        typer.Option(help="The relabel's --input-size: N or HxW [default: the base size]."),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(help="Per-channel mean in [0,1] units [default: ImageNet's for RGB]."),
    ] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, like --mean.")] = None,
    codec: Annotated[
        str | None,
        typer.Option(
            help="Label codec, as for relabel [default: int8; fp16 for 8 classes or fewer].",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Import the files' first E epochs [default: all].")
    ] = None,
    mix_alpha: Annotated[
        float | None,
        typer.Option(
            help="The relabel's λ ~ Beta(α, α), for the manifest (the files omit it) "
            "[default: SRe2L's: 1 for CutMix, 0.8 for Mixup].",
            show_default=False,
        ),
    ] = None,
    shard_epochs: Annotated[
        int | None, typer.Option(help="Epochs per shard [default: as relabel picks].")
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Import an SRe2L-family relabel (SRe2L, CDA, LPLD, LPQLD) as a label set.

    Each batch file's crops, flips, CutMix or Mixup and teacher logits, mapped to their
    images by replaying the relabel's sampler, become per-sample views, mixes and GIFT
    labels that serve at any batch size and world size. Every file is checked before
    anything is written, loaded weights-only (a file holding code is refused). Resumable:
    rerun the same command after an interruption.
    """
    from softserve.worker.sre2l import ImportOptions
    from softserve.worker.sre2l import import_sre2l as run_import

    opts = ImportOptions(
        labels=labels, images=images, out=out, seed=seed, size=_size(size),
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), codec=codec, epochs=epochs,
        mix_alpha=mix_alpha, shard_epochs=shard_epochs, progress=progress,
    )  # fmt: skip
    try:
        result = run_import(opts)
    except KeyboardInterrupt:
        _interrupted(f"complete shards in {out} are kept; rerun the same command to resume")
    config = result.manifest.config
    if result.computed_shards == 0:
        stdout.print(f"{out} is already complete; nothing to do")
    else:
        mix = config.mix.kind if config.mix is not None else "no mix"
        stdout.print(
            f"wrote {out}: {config.epochs} epochs of {config.num_samples} samples ({mix}), "
            f"{config.codec}, {result.manifest.label_bytes() / 2**20:.2f} MiB of labels"
        )
    if result.left_out:
        err.print(
            f"note: the relabel dropped each epoch's last partial batch; epoch k of the set "
            f"holds each image's k-th view, and {result.left_out} of {result.views} views, "
            "beyond the fewest an image has, are left out (README: Coming from SRe2L)",
            soft_wrap=True,
        )
    if result.downscaled:
        stdout.print(
            f"{result.downscaled} of {result.views} views crop more pixels than --size: SRe2L's "
            "teacher saw them antialiased (PIL), and the set's views are antialiased bilinear "
            "(interpolation bilinear-antialias)",
            soft_wrap=True,
        )


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Label set directory STORE/NAME.")],
    json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Summarize a label set: samples, classes, epochs, teacher, codec, sizes, bytes per label."""
    from softserve.storage.summary import describe

    if json:
        from softserve.storage.manifest import read_manifest

        stdout.print_json(read_manifest(path).model_dump_json())
        return
    table = Table(show_header=False, box=None)
    for key, value in describe(path):
        table.add_row(f"[bold]{key}[/]", value)
    stdout.print(table)


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="Label set directory STORE/NAME.")]) -> None:
    """Check each file's size, sha256, shapes and dtypes against the manifest, and that each
    stored epoch's order is a permutation of the samples; exit 1 on any problem."""
    from softserve.storage.verify import verify_label_set

    with err.status("verifying") as status:
        problems = verify_label_set(path, progress=lambda f: status.update(f"verifying {f}"))
    if problems:
        for problem in problems:
            err.print(f"[red]FAIL[/] {escape(problem)}", soft_wrap=True)
        raise typer.Exit(1)
    stdout.print(f"OK {path}")


@app.command()
def report(
    ctx: typer.Context,
    path: Annotated[
        Path | None, typer.Argument(help="Label set directory STORE/NAME (or use --url).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder [default: report-NAME].")
    ] = None,
    url: Annotated[str | None, typer.Option(help="Server URL, to report on a served set.")] = None,
    labelset: Annotated[str | None, typer.Option(help="Label set name on --url.")] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="SOFTSERVE_TOKEN", help="Bearer token (or SOFTSERVE_TOKEN)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the classes and samples shown.")] = 0,
    progress: ProgressOption = True,
) -> None:
    """Write a report on a label set: report.html (self-contained, figures inline),
    report.json (every number behind the figures) and figures/*.png.

    It shows views the teacher saw with its top-3 classes, agreement with the hard labels
    per class and epoch, entropy per class, how far GIFT's refinement moves labels, the
    hardest samples, storage per codec, and for top-k sets the mass kept. Output is
    deterministic: the same set and seed give the same bytes.
    """
    if (path is None) == (url is None) or (url is not None and labelset is None):
        raise InputError("give a label set directory STORE/NAME, or --url URL --labelset NAME")
    source = ctx.get_parameter_source("token")  # SOFTSERVE_TOKEN may well stay set
    token_flag = source is not None and source.name == "COMMANDLINE"
    if url is None and (labelset is not None or token_flag):
        raise InputError(
            "--labelset and --token are for a served set (--url URL); a label set directory "
            "STORE/NAME takes neither"
        )
    from tqdm import tqdm

    from softserve.report import RemoteSource, ReportOptions, StoreSource, compute_report
    from softserve.report.page import write_report

    source = StoreSource(path) if path is not None else RemoteSource(url, labelset, token)
    try:
        info = source.info
        with tqdm(total=info.epochs, desc="epochs", unit="epoch", disable=not progress) as bar:
            data = compute_report(source, ReportOptions(seed=seed), lambda _: bar.update())
    finally:
        source.close()
    page = write_report(data, out or Path(f"report-{info.name}"))
    stdout.print(f"report written: {page}")


@app.command()
def pull(
    url: Annotated[str, typer.Argument(help="Server URL, e.g. http://host:8000.")],
    labelset: Annotated[str, typer.Option(help="Label set name on the server.")],
    out: Annotated[Path, typer.Option(help="Label set directory to write: STORE/NAME.")],
    token: Annotated[
        str | None,
        typer.Option(envvar="SOFTSERVE_TOKEN", help="Bearer token (or SOFTSERVE_TOKEN)."),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Mirror a served label set into a local store, every file checked against its
    manifest's sha256.

    Files are fetched into STORE/.NAME.pull/ (never listed or served) and the set renamed
    into place once complete, its manifest written last. Rerun the same command after a cut
    to fetch only what is missing; an --out that already holds the server's version is left
    as it is.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from softserve.client.pull import pull as run_pull
    from softserve.client.pull import staging_folder

    columns = (f"pulling {escape(labelset)}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err, disable=not progress, transient=True) as bar:
        task = bar.add_task("pull", total=None)
        try:
            result = run_pull(
                url, labelset, out, token=token,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
        except KeyboardInterrupt:
            _interrupted(f"what was fetched is kept in {staging_folder(out)}; rerun to resume")
    if result.up_to_date:
        stdout.print(f"{escape(str(out))} is already up to date (version {result.digest[:12]})")
        return
    restarted = " (the server's set had changed since the last try: started over)"
    stdout.print(
        f"pulled {escape(labelset)} into {escape(str(out))}: version {result.digest[:12]}, "
        f"{result.files} files, {result.fetched_bytes / 2**20:.2f} MiB fetched"
        f"{restarted if result.restarted else ''}",
        soft_wrap=True,
    )


def _server_settings(**flags: object) -> ServiceSettings:
    """Server settings from the flags given (None: not given) over ``SOFTSERVE_*``; a bad
    value is one line naming the setting, before anything else runs."""
    from pydantic import ValidationError

    from softserve.service.settings import ServiceSettings

    try:
        return ServiceSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        raise InputError(
            f"bad server setting: {name} (SOFTSERVE_{name.upper()}): {first['msg']}"
        ) from None


@app.command()
def serve(
    store: Annotated[
        Path | None, typer.Option(help="Store folder of label sets [default: store].")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [default: 8000].")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes [default: 1].")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="Bearer tokens, one per line; unset: open access.")
    ] = None,
    image_cache_mb: Annotated[
        int | None, typer.Option(help="Base images kept in memory per process [default: 1024].")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Largest batch_size allowed [default: 8192].")
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="critical, error, warning, info, debug or trace [default: info]."),
    ] = None,
) -> None:
    """Serve the complete label sets of a store over HTTP (FastAPI + uvicorn).

    Every option can also be set as `SOFTSERVE_<OPTION>` (e.g. `SOFTSERVE_STORE`); flags win.
    New label sets are picked up without a restart. Metrics at /metrics; API docs at /docs
    only with `SOFTSERVE_DOCS=true` (off by default: Swagger UI loads scripts from a CDN).
    """
    from softserve.service.server import run

    settings = _server_settings(
        store=store, host=host, port=port, workers=workers, token_file=token_file,
        image_cache_mb=image_cache_mb, max_batch_size=max_batch_size, log_level=log_level,
    )  # fmt: skip
    run(settings)


@app.command()
@_with_teacher_options
def train(
    url: Annotated[
        list[str] | None, typer.Option(help="Server URL; repeat for failover. Served runs.")
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Local store to read the label set from (no server).")
    ] = None,
    labelset: Annotated[
        str | None, typer.Option(help="Label set name on the server or in --store.")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Online runs: this teacher labels fresh views each step.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="Online runs: the image set (ImageFolder or .pt).")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="Student: convnet (instance norm), convnet_bn (the GIFT evaluator's "
            "batch-norm ConvNet) or resnet18."
        ),
    ] = "convnet",
    width: Annotated[
        int | None, typer.Option(help="Channels of a ConvNet student [default: 128].")
    ] = None,
    loss: Annotated[
        str,
        typer.Option(help="gift, ce, softce, kl, mse, mse_ce, softce_ce, cosine (or kl_t2)."),
    ] = "gift",
    optimizer: Annotated[str, typer.Option(help="adamw, adam or sgd.")] = "adamw",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 300,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [default: 1e-3 adamw/adam, 0.01 sgd].")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Per rank [default: 10/50/100/200 by set size, as the evaluator]."),
    ] = None,
    eval: Annotated[
        str, typer.Option(help="fashion-mnist, or a test set (ImageFolder or .pt) path.")
    ] = "fashion-mnist",
    device: DeviceOption = "auto",
    token: Annotated[
        str | None,
        typer.Option(envvar="SOFTSERVE_TOKEN", help="Bearer token (or SOFTSERVE_TOKEN)."),
    ] = None,
    retry_seconds: Annotated[
        float, typer.Option(help="How long to keep retrying unreachable servers.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the student (and of online views).")] = 0,
    progress: ProgressOption = True,
    *,
    teacher_options: _TeacherOptions,
) -> None:
    """Train a student and report top-1 on a real test split; prints one JSON result line.

    Served: --url URL --labelset NAME trains on a label set's precomputed labels; with
    --store STORE instead of --url it reads STORE/NAME directly, with no server.
    Online: --teacher SPEC --weights W --images SRC runs the teacher on fresh views every
    step instead (view options as for relabel): what precomputing labels is measured against.

    Defaults are the official GIFT evaluator's: AdamW (lr 1e-3, wd 1e-4), the learning rate
    times 0.2 at 2/3 and 5/6 of the epochs, batch size by set size.
    """
    import json as json_lib

    from softserve.train import TrainOptions
    from softserve.train import train as run_train
    from softserve.worker.sources import TeacherInputs

    online = None
    if teacher is not None or images is not None:
        if teacher is None or images is None:
            raise InputError("an online run needs both --teacher and --images")
        online = TeacherInputs(teacher=teacher, images=images, **teacher_options.inputs())
    elif teacher_options != _TeacherOptions():
        given = [_flag(f.name, f.default) for f in dataclasses.fields(_TeacherOptions)
                 if getattr(teacher_options, f.name) != f.default]  # fmt: skip
        raise InputError(
            f"{', '.join(given)} shape an online teacher's views and labels; a served run "
            "trains on the set's own: drop them, or pass --teacher and --images"
        )
    opts = TrainOptions(
        urls=url or (), store=store, labelset=labelset, online=online, model=model, width=width,
        loss=loss,
        optimizer=optimizer, epochs=epochs, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, eval=eval, device=device, token=token,
        retry_seconds=retry_seconds, seed=seed, progress=progress,
    )  # fmt: skip
    print(json_lib.dumps(run_train(opts)))


WorkdirOption = Annotated[Path, typer.Option(help="Where the teacher and synthetic set go.")]
StoreOption = Annotated[Path, typer.Option(help="Store that receives the label set.")]
LabelEpochsOption = Annotated[int, typer.Option(help="Epochs of views to relabel.")]
DataOption = Annotated[
    Path | None, typer.Option(help="Folder with the Fashion-MNIST IDX files [default: Debian's].")
]


def _prepare_demo(opts: DemoOptions) -> Path:
    from softserve.worker.demo import prepare_demo

    try:
        result = prepare_demo(opts, log=stdout.print)
    except KeyboardInterrupt:
        _interrupted("rerun the same command to continue")
    stdout.print(f"label set ready: {result.label_set} (evaluate with --eval {result.eval_set})")
    return result.label_set


@demo_app.command("prepare")
def demo_prepare(
    task: Annotated[
        str,
        typer.Option(
            help="fashion-mnist (K = 10), or its composites: pairs (two garments side by "
            "side, K = 100) or triplets (three, K = 1000), each with its own test split."
        ),
    ] = "fashion-mnist",
    workdir: WorkdirOption = Path("demo"),
    store: StoreOption = Path("store"),
    data: DataOption = None,
    ipc: Annotated[int, typer.Option(help="Synthetic images per class.")] = 10,
    teacher_epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 3,
    train_limit: Annotated[
        int | None, typer.Option(help="Train the teacher on this many images only (quick runs).")
    ] = None,
    label_epochs: LabelEpochsOption = 300,
    codec: Annotated[
        str | None,
        typer.Option(help=f"Label codec [default: {_DEFAULT_CODECS}].", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of teacher training, selection and views.")] = 0,
    views: ViewsOption = "rrc",
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Train a Fashion-MNIST teacher, pick --ipc images per class by confidence, relabel them.

    With --task pairs or triplets the same tile teacher scores composites of garments
    (its logit for class abc is the sum of the tiles' logits), and the set is --ipc
    composites per class; the test split is written beside it (train --eval PATH).
    --views dsa labels DSA views into TASK-ipcK-dsa, beside the crop set, same teacher."""
    from softserve.worker.demo import DemoOptions

    _prepare_demo(
        DemoOptions(
            task=task,
            workdir=workdir,
            store=store,
            data=data,
            ipc=ipc,
            teacher_epochs=teacher_epochs,
            train_limit=train_limit,
            label_epochs=label_epochs,
            codec=codec,
            views=views,
            seed=seed,
            device=device,
            progress=progress,
        )  # fmt: skip
    )


@demo_app.command("run")
def demo_run(
    workdir: WorkdirOption = Path("demo"),
    store: StoreOption = Path("store"),
    data: DataOption = None,
    label_epochs: LabelEpochsOption = 300,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8000,
) -> None:
    """Prepare the demo label set (cached after the first run), then serve it on localhost.

    The store and port are the demo's own (on 127.0.0.1); other server settings come from
    `SOFTSERVE_<SETTING>`, as for serve, checked before the preparation starts.
    """
    from softserve.service.server import run
    from softserve.worker.demo import DemoOptions

    settings = _server_settings(store=store, host="127.0.0.1", port=port)
    opts = DemoOptions(
        workdir=workdir, store=store, data=data, label_epochs=label_epochs, device=device,
        progress=progress,
    )  # fmt: skip
    label_set = _prepare_demo(opts)
    stdout.print(
        "\nTrain a student against it, from another shell:\n\n"
        f"  .venv/bin/softserve train --url http://127.0.0.1:{port} --labelset {label_set.name} "
        "--model convnet --loss gift --optimizer adamw --epochs 300 --eval fashion-mnist\n\n"
        "See what the teacher said, in a browser (from this machine):\n\n"
        f"  http://127.0.0.1:{port}/ui?set={label_set.name}\n\n"
        f"or as a report: .venv/bin/softserve report {label_set}\n",
        soft_wrap=True,
    )
    run(settings)


cache_app = typer.Typer(
    help="The node's base-image cache: one file per label-set version, mapped by every "
    "process of the machine (SOFTSERVE_CACHE_DIR, default ~/.cache/softserve).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


def _cache_folder() -> Path:
    from softserve.client.cache import ENV, cache_dir

    directory = cache_dir()
    if directory is None:
        stdout.print(f"the node's image cache is off ({ENV}=off)")
        raise typer.Exit()
    return directory


@cache_app.command("list")
def cache_list() -> None:
    """Each cached version: label set, digests, size, last use; 'changed' when the file was
    written since it was hashed (it is hashed again, or fetched again, on its next use)."""
    import time

    from softserve.client.cache import entries

    directory = _cache_folder()
    found = entries(directory)
    table = Table("label set", "version", "images", "MiB", "last use", "state", box=None)
    for e in found:
        when = e.last_used and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        table.add_row(
            escape(e.name or "?"), (e.digest or "?")[:12], (e.dataset_sha256 or "?")[:12],
            f"{e.bytes / 2**20:.1f}", when or "never", "verified" if e.verified else "changed",
        )  # fmt: skip
    total = sum(e.bytes for e in found) / 2**20
    plural = "" if len(found) == 1 else "s"
    stdout.print(f"{escape(str(directory))}: {len(found)} version{plural}, {total:.1f} MiB")
    if found:
        stdout.print(table)


@cache_app.command("clear")
def cache_clear(
    name: Annotated[
        str | None, typer.Argument(help="Only this label set's versions [default: all].")
    ] = None,
) -> None:
    """Remove cached versions; one a process is writing now is left. Jobs that have a file
    mapped keep reading it (its space is freed when they end)."""
    from softserve.client.cache import clear

    directory = _cache_folder()
    removed, busy = clear(directory, name)
    for stem in busy:
        err.print(f"[yellow]skipped[/] {stem}: a process is writing it")
    plural = "" if len(removed) == 1 else "s"
    stdout.print(f"removed {len(removed)} version{plural} from {escape(str(directory))}")


def _terminate(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _stopped(what: str | None = None) -> NoReturn:
    err.print("[yellow]interrupted[/]" + (f"[yellow]:[/] {escape(what)}" if what else ""))
    sys.exit(130)


def main() -> None:
    """Entry point: user-fixable problems print one line and exit 1, and Ctrl-C or SIGTERM
    one line and exit 130, without a traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Interrupted as exc:
        _stopped(str(exc))
    except SoftserveError as exc:
        message = escape(" ".join(str(exc).split()))
        err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _stopped()
    except SystemExit as exc:
        if exc.code == 130:  # typer's silent exit for a KeyboardInterrupt in a command
            _stopped()
        raise
