"""The service segments: private to their user, named after the service, checked when attached."""
import os
import stat

import pytest

from speedysvc import LocalService, SpeedysvcError, connect, shm
from speedysvc import _shmcore as core
from conftest import our_segments
from services import Kitchen


def test_segments_are_private_and_named_after_service_and_user():
    with LocalService(Kitchen, workers=1), connect(Kitchen) as c:
        c.echo_msgpack(1)
        names = our_segments()
        assert f"{shm.PREFIX}.{shm.USER}.kitchen" in names
        assert any(n.startswith(f"{shm.PREFIX}.{shm.USER}.kitchen.{os.getpid()}-") for n in names)
        for n in names:
            mode = stat.S_IMODE(os.stat(os.path.join(shm.SHM_DIR, n)).st_mode)
            assert mode == 0o600, (n, oct(mode))
    assert not our_segments()


def test_service_names_are_validated():
    class Bad(Kitchen):
        name = "../etc"

    with pytest.raises(ValueError, match="name"):
        connect(Bad)
    with pytest.raises(ValueError, match="name"):
        LocalService(Bad)


def test_not_a_speedysvc_segment_is_refused():
    name = f"{shm.PREFIX}.{shm.USER}.impostor"
    r, _ = shm.create_segment(name, core.H_CHANNELS + 64)
    try:
        with pytest.raises(SpeedysvcError, match="not a speedysvc segment"):
            shm.ServiceSegment.attach("impostor")
    finally:
        r.release()
        shm.unlink_segment(name)
