"""TCP clients spread over the workers that serve TCP themselves (tests/tcp, tests/manager)."""


def clients_by_worker(make_client, n_workers, most=64):
    """Connections from ``make_client()`` until each worker runs the calls of one of them (the
    kernel spreads connections over the workers' listeners; an idle worker runs a call of its own
    connection itself): {worker pid: client}; the others are closed."""
    by_pid, spare = {}, []
    for _ in range(most):
        c = make_client()
        c.whoami()   # (a method no worker ran yet goes to the pool: the next one runs in this one)
        pid = c.whoami()
        if pid in by_pid:
            spare.append(c)
        else:
            by_pid[pid] = c
        if len(by_pid) == n_workers:
            break
    for c in spare:
        c.close()
    assert len(by_pid) == n_workers, f"connections reached {len(by_pid)} of {n_workers} workers"
    return by_pid
