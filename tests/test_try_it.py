"""The README's "try it on a laptop", as a newcomer runs it: scan a folder, make a moderator
token, serve, sign in and find the flagged pictures in the review queue. The real commands
in subprocesses, on a fresh data folder with the embedded defaults (SQLite, local files, no
broker), and no setting but ``SYNTHSENTRY_DATA_DIR``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from provenance_fixtures import png_with_chunks, text_chunk

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DEADLINE_S = 20.0


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"),
        HF_HUB_OFFLINE="1",  # a newcomer's machine has no model weights yet
        HF_HOME=str(tmp_path / "hf"),
    )
    return env


def _synthsentry(env: dict[str, str], *args: str | Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _flagged_png(seed: int) -> bytes:
    """A gradient PNG with AUTOMATIC1111's generation settings in a text chunk."""
    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    pixels = np.stack(
        [
            np.tile(ramp, (256, 1)),
            np.tile(ramp[:, None], (1, 256)),
            np.full((256, 256), 40 * seed, dtype=np.uint8),
        ],
        axis=-1,
    )
    settings = f"a gradient, number {seed}\nSteps: 20, Sampler: Euler a, Seed: {seed}"
    return png_with_chunks([text_chunk("parameters", settings)], Image.fromarray(pixels, "RGB"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """``synthsentry serve`` on a free port until /healthz answers; stopped on the way out,
    whatever happened."""
    port = _free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "synthsentry.cli", "serve", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not answer within {DEADLINE_S:.0f} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _hidden_field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found is not None, f"no {name} field on the page"
    return found.group(1)


def test_scan_make_a_token_serve_and_review_the_flagged_pictures(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    shutil.copytree(SAMPLES, folder / "samples")
    generated = {f"render-{seed}.png": _flagged_png(seed) for seed in range(1, 4)}
    for name, data in generated.items():
        (folder / name).write_bytes(data)
    env = _environment(tmp_path)

    results = [
        json.loads(line)
        for line in _synthsentry(env, "scan", folder, "--json", "--no-progress").splitlines()
    ]
    assert len(results) == len(generated) + len(list(SAMPLES.iterdir()))
    flagged = {r["sha256"] for r in results if r["flagged"]}
    rendered = {r["sha256"] for r in results if Path(r["path"]).name in generated}
    assert len(rendered) == len(generated) and rendered <= flagged

    issued = json.loads(
        _synthsentry(env, "tokens", "create", "--role", "moderator", "--name", "me", "--json")
    )
    assert issued["role"] == "moderator" and issued["token"].startswith("sst_")

    with (
        _serving(env, tmp_path / "serve.log") as base_url,
        httpx.Client(base_url=base_url, timeout=DEADLINE_S) as client,
    ):
        form = client.get("/review/login")
        assert form.status_code == 200
        signed_in = client.post(
            "/review/login",
            data={"token": issued["token"], "csrf_token": _hidden_field(form.text, "csrf_token")},
        )
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/review"

        queue = client.get("/review")
        assert queue.status_code == 200
        assert "Signed in as <strong>me</strong> (moderator)" in queue.text
        open_count = re.search(r'data-count="open">(\d+)<', queue.text)
        assert open_count is not None and int(open_count.group(1)) == len(flagged)
        assert f"{len(flagged)} cases match" in queue.text
        rows = dict(
            re.findall(
                r'<tr data-case-id="(\d+)">.*?<code title="([0-9a-f]{64})">', queue.text, re.S
            )
        )
        assert set(rows.values()) == flagged

        for case_id, sha256 in rows.items():
            if sha256 not in rendered:
                continue
            thumbnail = client.get(f"/review/cases/{case_id}/thumbnail")
            assert thumbnail.status_code == 200
            assert thumbnail.headers["content-type"] == "image/jpeg"
            picture = Image.open(io.BytesIO(thumbnail.content))
            assert picture.format == "JPEG" and min(picture.size) > 0
