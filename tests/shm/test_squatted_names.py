"""Names in /dev/shm that are not ours: another user's file (a squatter's, or that of a user whose
name sanitises to ours) or a symbolic link.  Nothing of speedysvc follows the link or touches the
file; what needs the name fails with SegmentNotOurs, which names the path and its owner and says
what to do.  Files of another user are made as root (uid 65534 owns them)."""
import contextlib
import os

import pytest

from speedysvc import LocalService, SegmentNotOurs, SpeedysvcError, connect, shm
from speedysvc.shm import segment
from services import Other

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user (uid 65534) is made as root")


def shm_path(name: str) -> str:
    return os.path.join(shm.SHM_DIR, name)


@contextlib.contextmanager
def squatted(name: str, kind: str, target: str | None = None, uid: int = NOBODY):
    """``name`` in /dev/shm taken by a file (or a symbolic link to ``target``) of ``uid``."""
    path = shm_path(name)
    if kind == "file":
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"not a segment")
        os.fchown(fd, uid, uid)
        os.close(fd)
    else:
        os.symlink(target, path)
        os.lchown(path, uid, uid)
    before = os.lstat(path)
    try:
        yield path
        after = os.lstat(path)   # still there, as it was
        assert (after.st_ino, after.st_uid, after.st_mode) == (before.st_ino, before.st_uid, before.st_mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.fixture
def ours(tmp_path):
    """A file of ours for a symbolic link to point to: it must come out of the test untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    yield str(victim)
    assert victim.read_bytes() == b"precious"


def check_error(e: SegmentNotOurs, path: str, uid: int) -> None:
    assert isinstance(e, PermissionError) and isinstance(e, SpeedysvcError)
    assert e.path == path and e.uid == uid
    message = str(e)
    assert path in message and f"uid {uid}" in message and "SPEEDYSVC_NAMESPACE" in message
    assert f"rm {path}" in message
    assert ("as root" in message) == (uid != os.getuid())


@as_root
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_local_service_refuses_a_squatted_service_name(kind, ours):
    with squatted(segment.service_segment_name("other"), kind, ours) as path:
        with pytest.raises(SegmentNotOurs) as info:
            LocalService(Other, workers=1).start()
        check_error(info.value, path, NOBODY)
        assert info.value.symlink == (kind == "symlink")
        assert ("symbolic link" in str(info.value)) == (kind == "symlink")
        # and a client is told the same
        with pytest.raises(SegmentNotOurs) as info:
            with connect(Other, timeout=5) as c:
                c.whoami()
        check_error(info.value, path, NOBODY)


def test_a_symbolic_link_of_our_own_is_not_followed_either(ours):
    with squatted(segment.service_segment_name("other"), "symlink", ours, uid=os.getuid()) as path:
        with pytest.raises(SegmentNotOurs) as info:
            LocalService(Other, workers=1).start()
        check_error(info.value, path, os.getuid())
        assert "Remove it (rm" in str(info.value)


@as_root
def test_a_squatted_starting_name_is_refused():
    """The service segment is filled in under a temporary name first: taken, it is refused too."""
    with squatted(f"{segment.service_segment_name('other')}.starting-{os.getpid()}", "file") as path:
        with pytest.raises(SegmentNotOurs) as info:
            shm.ServiceSegment.create("other")
        check_error(info.value, path, NOBODY)


def as_nobody(work) -> None:
    """Run ``work()`` in a forked child with uid 65534: another user, whose name sanitises to
    ours (the child keeps this process's names)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@as_root
def test_another_users_segments_under_our_names_are_neither_shared_nor_removed():
    """Another user's service segment and data segment under the names we would use: attach,
    create, open, grow into, free and remove all leave them alone (and say why where they
    need the name)."""
    mine = shm.ServiceSegment.create("mine")
    me = os.getpid()
    twin_data = segment.data_segment_name("mine", me, 0, 1)

    def squat():
        shm.ServiceSegment.create("twin")
        segment.create_segment(twin_data, 4096)

    twins = [shm_path(segment.service_segment_name("twin")), shm_path(twin_data)]
    try:
        as_nobody(squat)
        assert [os.lstat(p).st_uid for p in twins] == [NOBODY, NOBODY]
        with pytest.raises(SegmentNotOurs) as info:
            shm.ServiceSegment.attach("twin")
        check_error(info.value, twins[0], NOBODY)
        with pytest.raises(SegmentNotOurs):      # its owner is dead: a segment of ours would be removed
            shm.ServiceSegment.create("twin")
        shm.remove_service_segments("twin")
        with pytest.raises(SegmentNotOurs) as info:
            shm.DataSegment.open("mine", me, 0, 1)
        check_error(info.value, twins[1], NOBODY)
        with pytest.raises(SegmentNotOurs):
            shm.DataSegment.create("mine", me, 0, 1, 4096)
        with pytest.raises(SegmentNotOurs):
            shm.replace_data_segment(mine, 0, me, 4096)   # the next generation's name is taken
        shm.unlink_segment(twin_data)
        mine.free_channel(0, me)                          # globs the channel's data segments
        mine.destroy()                                    # removes every segment of "mine"
        assert all(os.lstat(p).st_uid == NOBODY for p in twins)
    finally:
        mine.destroy()
        for p in twins:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
