"""`edgesep` commands for the device stage, registered on the main typer app by `edgesep.cli`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edgesep.errors import ConfigError

__all__ = ["register"]

device_app = typer.Typer(
    name="device",
    help="Devices: check a device profile, emulated ARM roots.",
    no_args_is_help=True,
)
EMULATED_ARCHS = ("arm64",)


@device_app.command("emulate")
def emulate_cmd(
    arch: Annotated[str, typer.Argument(help="Architecture to emulate: arm64 (aarch64 Debian under qemu-user).")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Directory of the root (created, resumed or repaired). "
            "Default: $EDGESEP_ARM64_ROOT, else ~/.cache/edgesep/arm64-root.",
        ),
    ] = None,
    mirror: Annotated[
        str | None, typer.Option(help="Debian mirror URL (default: the one apt's own sources use).")
    ] = None,
    wheel_cache: Annotated[
        Path | None,
        typer.Option(help="Where downloaded aarch64 wheels are kept (default ~/.cache/edgesep/wheels-aarch64)."),
    ] = None,
    versions: Annotated[
        bool, typer.Option(help="Run python in the root to report its numpy / ONNX Runtime / TVM (about 20 s).")
    ] = True,
) -> None:
    """Build a Debian arm64 root with python and the aarch64 runtimes, run under qemu: for correctness, not timing."""
    from edgesep.cli import err_console, out_console
    from edgesep.devices.emulate import (
        build_arm64_root,
        default_root,
        describe_root,
        missing_host_tools,
    )

    if arch not in EMULATED_ARCHS:
        raise ConfigError(f"cannot emulate {arch!r}; supported: {', '.join(EMULATED_ARCHS)}")
    root = root or default_root()

    def log(line: str) -> None:  # paths and commands stay on one line (soft_wrap), whatever the terminal width
        err_console.print(line, highlight=False, markup=False, soft_wrap=True)

    build_arm64_root(root, mirror=mirror, wheel_cache=wheel_cache, progress=sys.stderr.isatty(), log=log)
    info = describe_root(root, versions=versions)
    lines = [
        f"arm64 root {info['root']}: {info['size_bytes'] / 1e6:,.0f} MB, recipe {info['recipe']}, "
        f"built {info['built']}",
        f"wheels: {', '.join(info['wheels'])}",
    ]
    if versions:
        lines.append(
            f"inside the root ({info['machine']}, under qemu): python {info['python']}, numpy {info['numpy']}, "
            f"onnxruntime {info['onnxruntime']}, tvm {info['tvm']}"
        )
    if missing_host_tools(["aarch64-linux-gnu-gcc"]):
        lines.append(
            "note: aarch64-linux-gnu-gcc is missing; cross-compiling TVM libraries for this device needs "
            "`apt-get install -y gcc-aarch64-linux-gnu`"
        )
    lines.append(
        f"run code there: chroot {info['root']} /usr/bin/qemu-aarch64-static /usr/bin/python3.11 ... "
        "(or edgesep.devices.emulate.run_in_root); timings under qemu are meaningless"
    )
    for line in lines:
        out_console.print(line, highlight=False, markup=False, soft_wrap=True)


@device_app.command("check")
def check_cmd(
    profile: Annotated[str, typer.Argument(help="Device profile: an id (`edgesep devices`) or a TOML file's path.")],
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Also check this bundle: its artifacts for the device, its size.")
    ] = None,
    trust_new_host: Annotated[
        bool,
        typer.Option(
            "--trust-new-host",
            help="ssh: accept an unknown host key (its SHA256 fingerprint is printed and recorded in the profile's "
            "known_hosts). A changed key is always refused.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a device: reachable, architecture, python, numpy, runtime versions, the bundle's needs, free disk.

    Exit 0 when every check passes, 1 when one fails (each failing check says what to install or do), 2 for a
    user error (unknown profile, invalid profile file).
    """
    import json

    from edgesep.cli import _table, err_console, out_console
    from edgesep.devices.check import check_device

    def log(line: str) -> None:
        err_console.print(line, highlight=False, markup=False, soft_wrap=True)

    result = check_device(profile, bundle, trust_new_host, log=log)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        rows = [["check", "ok", "detail", "fix"]]
        for c in result["checks"]:
            mark = "skip" if c.get("skipped") else ("ok" if c["ok"] else "FAIL")
            rows.append([c["name"], mark, c["detail"], c["fix"] or "-"])
        title = f"device check: {result['profile']} ({result['transport']})"
        out_console.print(_table(title, rows, left=4))
        failed = [c["name"] for c in result["checks"] if not c["ok"]]
        summary = "all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}"
        out_console.print(summary, highlight=False, markup=False, soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)


def devices_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False,
) -> None:
    """List device profiles: the shipped ones and $EDGESEP_PROFILES_DIR/*.toml."""
    import json

    from edgesep.cli import _table, out_console
    from edgesep.devices import list_profiles

    profiles = list_profiles()
    if as_json:
        sys.stdout.write(json.dumps([p.to_dict() for p in profiles], indent=2) + "\n")
        return

    def target(p: object) -> str:
        t = getattr(p, "target", None)
        return "-" if t is None else (t if isinstance(t, str) else json.dumps(t, separators=(",", ":")))

    rows = [["id", "arch", "transport", "address", "runtime", "target", "notes"]]
    for p in profiles:
        address = p.address or ("-" if p.transport != "local" else "this machine")
        if p.address and p.port:
            address = f"{p.address}:{p.port}"
        transport = f"{p.transport} (emulated)" if p.emulated else p.transport
        rows.append([p.id, p.arch, transport, address, p.runtime, target(p), p.notes or p.description])
    out_console.print(_table("device profiles", rows, left=7))


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.add_typer(device_app, name="device")
    app.command("devices")(devices_cmd)
