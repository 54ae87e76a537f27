"""The schedulers wsi-ircr starts (local, SLURM) serve no dashboard: the HTTP server distributed
always starts listens on a free port of 127.0.0.1, not on :8787 of the scheduler's address,
so a busy 8787 gives no warning and nothing is opened to the network."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request
import warnings

import pytest

from wsi_ircr.slide.cluster import SlurmConfig, local_client, slurm_cluster
from wsi_ircr.slide.config import SegmentConfig


@contextlib.contextmanager
def port_8787_busy():
    """Hold 127.0.0.1:8787 (unless something else already does)."""
    with socket.socket() as s:
        with contextlib.suppress(OSError):
            s.bind(("127.0.0.1", 8787))
            s.listen()
        yield


def assert_no_dashboard(scheduler, caught) -> None:
    from distributed.comm.utils import get_tcp_server_addresses

    addresses = get_tcp_server_addresses(scheduler.http_server)
    assert addresses and all(host == "127.0.0.1" and port != 8787 for host, port in addresses), addresses
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{addresses[0][1]}/status", timeout=10)
    assert e.value.code == 404  # no dashboard page (nor the one saying bokeh is missing)
    assert not [str(w.message) for w in caught if "8787" in str(w.message)]


def test_slurm_scheduler_has_no_dashboard_and_leaves_8787_alone():
    pytest.importorskip("dask_jobqueue")
    with port_8787_busy(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cluster = slurm_cluster(SlurmConfig(cores=1, memory="1GB", interface="lo"))
        try:
            assert_no_dashboard(cluster.scheduler, caught)
        finally:
            cluster.close()


def test_local_scheduler_has_no_dashboard_and_leaves_8787_alone():
    with port_8787_busy(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with local_client(SegmentConfig(workers=1, threads_per_worker=1)) as client:
            assert_no_dashboard(client.cluster.scheduler, caught)
