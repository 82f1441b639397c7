"""The demo's request queue (``--concurrency``, ``--max-size``) with real concurrent clients: a
``visiontools demo`` server on a free local port, many gradio_client users calling the merge view at
once. The server's merge callback is wrapped to hold each request 0.5 s and report how many run at
the same time, so the queue fills the same way on any machine."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from demo_server import HOLDING_LAUNCHER, DemoServer

from visiontools.demos.images import example_images

CAT = next(p for p in example_images() if p.endswith("cat.jpg"))


class Server(DemoServer):
    """``visiontools demo`` with the held merge callback, in a subprocess."""

    def __init__(self, tmp_path: Path, *options: str):
        super().__init__(tmp_path / "demo.log", *options, launcher=HOLDING_LAUNCHER,
                         env={"GRADIO_ANALYTICS_ENABLED": "False", "VT_HOLD_SECONDS": "0.5"})

    def most_active(self) -> int:
        """Largest number of merge requests the server ran at the same time."""
        return max(int(n) for n in re.findall(r"^ACTIVE (\d+)$", self.output(), re.M))


def _users_at_once(url: str, n: int) -> list[str]:
    """``n`` users (own gradio_client sessions) ask for the merge view at the same moment; returns
    'ok' or the error text for each."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False, download_files=False) for _ in range(n)]  # connected first

    def ask(client):
        try:
            job = client.submit(handle_file(CAT), "default", 4, "constant", 12, 1.0, api_name="/run_merge")
            out = job.result(timeout=180)
            return "ok" if out[0] is not None and "patch groups" in out[2] else f"bad output {out!r:.200}"
        except Exception as e:  # noqa: BLE001  (the refusal is the point of one test)
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(ask, clients))


def test_default_queue_serves_20_merge_view_users_at_once(tmp_path):
    server = Server(tmp_path)
    try:
        results = _users_at_once(server.url, 20)
        assert results == ["ok"] * 20, results
        assert server.most_active() == 2  # default --concurrency
    finally:
        server.close()


def test_concurrency_and_max_size_options(tmp_path):
    server = Server(tmp_path, "--concurrency", "3", "--max-size", "4")
    try:
        results = _users_at_once(server.url, 12)
        refused = [r for r in results if r != "ok"]
        # 3 run, up to 4 wait: the rest of the burst is turned away with gradio's message. How many
        # get in depends on arrival order on a loaded machine (6 and 7 were both seen), so the
        # test asks only that some are refused, that at least the running ones are served, and
        # (below) that exactly 3 ran at once.
        assert refused and all("Queue is full" in r for r in refused), results
        assert results.count("ok") >= 3
        assert server.most_active() == 3
    finally:
        server.close()
