"""Downloads from a local HTTP server: an interrupted download resumes with a Range request, a
progress bar is shown, a wrong checksum leaves nothing in the cache, an unreachable server gives
the URL and the cache path to put a hand-downloaded file, and a backbone is fetched once."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from arenaseg import backbones
from arenaseg.download import fetch, recorded_sha256
from arenaseg.errors import ArenaError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server:
    """Serves ``files`` (path → bytes) with Range support; records the Range headers seen and
    the bytes sent."""

    def __init__(self, files):
        self.files, self.ranges, self.sent = files, [], 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                ctype = "text/html" if self.path.endswith(".html") else "application/octet-stream"
                start = 0
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                server.sent += len(body) - start  # before writing: the client may finish first
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({"/w.bin": PAYLOAD, "/page.html": b"<html>sign in</html>"})
    yield s
    s.close()


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_fetch_resumes_a_partial_download_with_progress(server, tmp_path, capsys):
    dest = tmp_path / "cache" / "w.bin"
    dest.parent.mkdir()
    part = dest.with_name("w.bin.part")
    part.write_bytes(PAYLOAD[:300_000])
    seen = []  # what a GUI is told: bytes so far of the total
    assert fetch(server.url + "/w.bin", dest, sha256=SHA, size=len(PAYLOAD),
                 progress=lambda done, total: seen.append((done, total))) == dest
    assert seen[0][0] > 300_000 and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.ranges == ["bytes=300000-"] and server.sent == len(PAYLOAD) - 300_000
    err = capsys.readouterr().err
    assert "w.bin" in err and "100%" in err  # tqdm progress bar on stderr
    # a second call finds the verified file in the cache: no request
    fetch(server.url + "/w.bin", dest, sha256=SHA)
    assert len(server.ranges) == 1


def test_checksum_mismatch_leaves_nothing_in_the_cache(server, tmp_path):
    dest = tmp_path / "cache" / "w.bin"
    with pytest.raises(ArenaError) as err:
        fetch(server.url + "/w.bin", dest, sha256="0" * 64, progress=False)
    message = str(err.value)
    assert SHA in message and "0" * 64 in message and str(dest) in message
    assert list(dest.parent.iterdir()) == []


def test_unreachable_server_names_url_and_cache_path(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/fseft.pth"
    dest = tmp_path / "cache" / "backbones" / "fseft.pth"
    with pytest.raises(ArenaError) as err:
        fetch(url, dest, progress=False, timeout=5)
    message = str(err.value)
    assert url in message and str(dest) in message and "by hand" in message
    assert not dest.exists()


def test_web_page_instead_of_the_file_is_refused(server, tmp_path):
    dest = tmp_path / "w.bin"
    with pytest.raises(ArenaError, match="web page"):
        fetch(server.url + "/page.html", dest, progress=False)
    assert not dest.exists()


def test_unpublished_hash_is_recorded_and_checked_later(server, tmp_path, capsys):
    dest = tmp_path / "w.bin"
    fetch(server.url + "/w.bin", dest, progress=False)
    assert recorded_sha256(dest).read_text().split()[0] == SHA
    assert SHA in capsys.readouterr().err
    dest.write_bytes(PAYLOAD[::-1])  # the cached file changes afterwards
    with pytest.raises(ArenaError, match=f"expected {SHA}"):
        fetch(server.url + "/w.bin", dest, progress=False)


def test_backbone_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    """The SuPreM U-Net entry, pointed at a local server serving a checkpoint in its layout."""
    spec = backbones.get_spec("suprem-unet")
    torch.manual_seed(7)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v)
             for k, v in spec.build().state_dict().items()}
    net = {"module.backbone." + k: v for k, v in state.items() if not k.startswith("classifier.")}
    net["module.controller.weight"] = torch.randn(153, 512, 1, 1, 1)
    torch.save({"net": net}, tmp_path / "ckpt.pth")
    data = (tmp_path / "ckpt.pth").read_bytes()
    s = Server({"/suprem.pth": data})
    try:
        source = dataclasses.replace(spec.source, urls=(s.url + "/suprem.pth",),
                                     sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        monkeypatch.setitem(backbones.REGISTRY, spec.id, dataclasses.replace(spec, source=source))
        monkeypatch.setenv("ARENASEG_CACHE", str(tmp_path / "cache"))
        told = []  # what the worker turns into "downloading" phase events
        model, _ = backbones.load_backbone(spec.id, progress=lambda done, total: told.append((done, total)))
        assert told and told[-1] == (len(data), len(data))
        cached = tmp_path / "cache" / "backbones" / spec.source.filename
        assert cached.read_bytes() == data
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if k.startswith("down_tr"))
        backbones.load_backbone(spec.id, progress=False)  # from the cache: no second request
        assert len(s.ranges) == 1
    finally:
        s.close()
