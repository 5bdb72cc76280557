"""Services for tests/test_tcp_review.py (workers import them by module name)."""
from speedysvc import pickle_method
from hostile_services import HostileEcho


class ReviewEcho(HostileEcho):
    """HostileEcho under a name and port of its own, plus a pickle method."""
    port = 5901
    name = "tcpr_echo"

    @pickle_method
    def echo_pickle(self, data):
        return data
