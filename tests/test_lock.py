"""The dependency locks (requirements/*.txt, made by `make lock`): every package pinned
with hashes, torch and CUDA's packages kept out, the locks agreeing with pyproject.toml
and with each other, the security floors and the kombu/Celery pins held, and the
Makefile, the Dockerfiles and this very environment installing exactly them."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
# Which extras each lock covers, and who installs it.
# The images carry the tracing extra, so OFA_OPENTELEMETRY can be turned on in them.
EXTRAS = {"api": ["tracing"], "worker": ["worker", "tracing"], "test": ["worker", "test"]}
INSTALLED_BY = {"api": "Dockerfile.api", "worker": "Dockerfile.worker", "test": "Makefile"}
# Installed before the lock, never from it.
OUTSIDE = re.compile(r"torch|triton|nvidia-.*|cuda-.*")
# First releases past the advisories we know of (pyproject.toml names them), for the
# packages that parse untrusted input.
FLOORS = {
    "python-multipart": "0.0.31",
    "starlette": "1.6.0",
    "pillow": "12.3.0",
    "h11": "0.16.0",
    "httptools": "0.6.4",
    "pyyaml": "5.4",
}
MARKERS = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}


def read_lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """{package: (version, hashes)}; fails on any line that is not a hashed pin."""
    text = (LOCKS / f"{name}.txt").read_text()
    pins: dict[str, tuple[Version, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        lines = [ln.strip() for ln in entry.splitlines() if not ln.strip().startswith("#")]
        if not lines:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)(?: ; .*)? \\", lines[0])
        assert match, f"{name}.txt: not a pin: {lines[0]!r}"
        hashes = [re.fullmatch(r"--hash=sha256:([0-9a-f]{64})( \\)?", ln) for ln in lines[1:]]
        assert hashes and all(hashes), f"{name}.txt: {match[1]} without sha256 hashes"
        pins[canonicalize_name(match[1])] = (Version(match[2]), [h[1] for h in hashes if h])
    return pins


def declared(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [
        r
        for r in reqs
        if canonicalize_name(r.name) != "ofa-entail"
        and (r.marker is None or r.marker.evaluate(MARKERS))
    ]


@pytest.fixture(scope="module", params=list(EXTRAS))
def lock(request: pytest.FixtureRequest) -> tuple[str, dict[str, tuple[Version, list[str]]]]:
    return request.param, read_lock(request.param)


def test_every_package_is_pinned_with_hashes_and_nothing_from_cuda(lock):
    name, pins = lock
    assert len(pins) > 40
    assert not [p for p in pins if OUTSIDE.fullmatch(p)], name
    header = (LOCKS / f"{name}.txt").read_text().splitlines()[1]
    assert "uv pip compile pyproject.toml" in header and "--generate-hashes" in header
    assert "--constraint requirements/torch.txt" in header and "--no-emit-package torch" in header
    for extra in EXTRAS[name]:
        if extra != "worker" or name == "worker":
            assert f"--extra {extra}" in header, name


def test_the_lock_holds_everything_pyproject_declares(lock):
    name, pins = lock
    for req in declared(EXTRAS[name]):
        key = canonicalize_name(req.name)
        if OUTSIDE.fullmatch(key):
            continue
        assert key in pins, f"{name}.txt lacks {req.name}: run `make lock`"
        assert req.specifier.contains(pins[key][0], prereleases=True), (name, str(req))
        for extra in req.extras:  # e.g. redis[hiredis], celery[redis]
            wanted = {"hiredis"} if key == "redis" and extra == "hiredis" else set()
            assert wanted <= set(pins), (name, str(req))


def test_object_storage_ships_in_both_images_and_its_test_server_in_neither():
    """obstore (shared/objects.py) in the API's and the worker's locks, pyarrow (Parquet
    results) in the worker's; moto and the boto stack it pulls in only in the tests'."""
    for name in ("api", "worker", "test"):
        assert "obstore" in read_lock(name), name
    assert "pyarrow" in read_lock("worker") and "pyarrow" in read_lock("test")
    assert "moto" in read_lock("test")
    for name in ("api", "worker"):
        assert not {"moto", "boto3", "botocore", "flask"} & set(read_lock(name)), name


def test_images_ship_the_versions_the_tests_run():
    tested = read_lock("test")
    for name in ("api", "worker"):
        for package, (version, _) in read_lock(name).items():
            assert tested.get(package, (None,))[0] == version, (name, package, version)
    assert "torch" not in {canonicalize_name(p) for p in read_lock("api")}


def test_security_floors_are_declared_and_locked():
    """pyproject's floor for each package that parses untrusted input is at least the
    first release past its advisories, and every lock holding it is above it."""
    declared_floors: dict[str, Version] = {}
    for req in declared(["worker", "test"]):
        for spec in req.specifier:
            if spec.operator == ">=":
                declared_floors[canonicalize_name(req.name)] = Version(spec.version)
    for package, floor in FLOORS.items():
        assert declared_floors[package] >= Version(floor), package
        for name in EXTRAS:
            pins = read_lock(name)
            if package in pins:
                assert pins[package][0] >= Version(floor), (name, package)
    assert "python-multipart" in read_lock("api") and "starlette" in read_lock("api")


def test_kombu_and_celery_are_pinned_to_the_patched_releases():
    """worker/broker.py restates kombu 5.7's Channel._brpop_read (which calls
    _flush_brpop_reauth, absent from 5.6) and patches its QoS: pyproject pins both
    packages to the one release those patches were written against (the seam checks it
    at import), every lock holds that release, and the internals they use exist in the
    kombu these tests run."""
    from kombu.transport.redis import Channel, QoS

    bounds: dict[str, SpecifierSet] = {
        canonicalize_name(r.name): r.specifier
        for r in declared([])
        if r.name in ("kombu", "celery")
    }
    for package in ("kombu", "celery"):
        spec: SpecifierSet = bounds[package]
        [pin] = list(spec)
        assert pin.operator == "==" and "*" not in pin.version, f"{package}: not pinned"
        assert not spec.contains("5.6.2") and not spec.contains("5.8.0"), (package, str(spec))
        for name in EXTRAS:
            assert spec.contains(read_lock(name)[package][0]), (name, package)
    for attribute in ("_brpop_read", "_flush_brpop_reauth", "_create_client"):
        assert hasattr(Channel, attribute), attribute
    for attribute in ("ack", "reject", "append", "pipe_or_acquire", "_remove_from_indices"):
        assert hasattr(QoS, attribute), attribute


def test_this_environment_is_the_test_lock():
    """make install put exactly the locked versions here (a package the lock does not
    hold may sit beside them; none of the locked ones differs)."""
    differ: dict[str, str | None] = {}
    for package, (version, _) in read_lock("test").items():
        try:
            installed = Version(metadata.version(package))
        except metadata.PackageNotFoundError:
            differ[package] = None
            continue
        if installed != version:
            differ[package] = str(installed)
    assert not differ, f"installed differs from requirements/test.txt: {differ} (make install)"


def test_installs_use_the_locks():
    """torch first (requirements/torch.txt), then a lock with --no-deps and
    --require-hashes, then the project without dependencies, then pip check."""
    torch = (LOCKS / "torch.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", torch, re.M)
    for name, file in INSTALLED_BY.items():
        text = (ROOT / file).read_text()
        lock_line = f"--no-deps --require-hashes -r requirements/{name}.txt"
        assert lock_line in text, file
        assert "pip check" in text and re.search(r"pip install (--quiet )?--no-deps (-e )?\.", text)
        if name != "api":
            assert text.index("-r requirements/torch.txt") < text.index(lock_line), file
        assert text.index(lock_line) < text.index("pip check"), file
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^\$\(VENV\)/\.installed: (.*)$", makefile, re.M)
    assert target and {"requirements/test.txt", "requirements/torch.txt"} <= set(target[1].split())
    assert re.search(r"^lock:", makefile, re.M)
