"""The autoscaling policies' decisions, as tables; how service.ini selects a policy; the load
signals a pool measures; the call watchdog."""
import sys
import textwrap
import types

import pytest

from speedysvc.manager import autoscale, watchdog
from speedysvc.manager.autoscale import DefaultPolicy, FixedPolicy, LoadMeter, Signals, busy_ns, policy_class
from speedysvc.manager.config import SERVICE_KEYS, ConfigError, check_policies, load


def config(**changes):
    """A service's configuration with the defaults of SERVICE_KEYS, 1 to 4 workers."""
    values = {key: default for key, (_, default, _) in SERVICE_KEYS.items()}
    values.update(min_proc_num=1, max_proc_num=4)
    values.update(changes)
    return types.SimpleNamespace(**values)


# The defaults: scale_up_queue 0.5, scale_up_busy 0.85, scale_up_cooldown 1.0, scale_down_busy 0.25,
# scale_down_after 30.0.  Each row: (workers, pending, busy, cpu, now) -> change
DEFAULT_UP = [
    ((1, 0.0, 0.0, 0.0, 10.0), 0, "idle at the minimum: nothing to do"),
    ((1, 0.5, 0.0, 0.0, 10.0), 1, "calls waiting (at the threshold): one more worker"),
    ((1, 0.4, 0.0, 0.0, 10.0), 0, "fewer calls waiting than the threshold, load low"),
    ((1, 2.2, 0.0, 0.0, 10.0), 3, "as many workers as calls wait, rounded up"),
    ((2, 9.0, 0.0, 0.0, 10.0), 2, "never above max_proc_num"),
    ((4, 9.0, 1.0, 1.0, 10.0), 0, "at max_proc_num already"),
    ((1, 0.0, 0.85, 0.0, 10.0), 1, "busy at the threshold: one more"),
    ((1, 0.0, 0.0, 0.9, 10.0), 1, "CPU counts as load too"),
    ((1, 0.0, 0.84, 0.84, 10.0), 0, "just under the threshold"),
    ((1, 1.0, 0.0, 0.0, 0.5), 0, "within scale_up_cooldown of the start"),
]


@pytest.mark.parametrize("row, change, why", DEFAULT_UP, ids=[r[2] for r in DEFAULT_UP])
def test_default_policy_scales_up(row, change, why):
    policy = DefaultPolicy(config())
    policy.started(0.0)
    assert policy.decide(Signals(*row)) == change, why


def test_default_policy_waits_for_its_cooldown_between_two_additions():
    policy = DefaultPolicy(config())
    policy.started(0.0)
    decisions = [(t, policy.decide(Signals(1, 1.0, 0.0, 0.0, t))) for t in (1.0, 1.5, 1.99, 2.0, 2.5, 3.0)]
    assert decisions == [(1.0, 1), (1.5, 0), (1.99, 0), (2.0, 1), (2.5, 0), (3.0, 1)]


# A sequence of decisions: (workers, pending, busy, cpu, now) -> change, in order, one policy.
DEFAULT_DOWN = [
    ((3, 0.0, 0.1, 0.1, 100.0), 0),    # load low: the timer starts
    ((3, 0.0, 0.1, 0.1, 129.9), 0),    # not yet scale_down_after
    ((3, 0.0, 0.1, 0.1, 130.0), -1),   # 30 s of low load: one fewer, the timer starts again
    ((2, 0.0, 0.1, 0.1, 145.0), 0),
    ((2, 0.0, 0.3, 0.1, 150.0), 0),    # busy 0.3: not low any more, the timer stops
    ((2, 0.0, 0.1, 0.1, 161.0), 0),    # low again: it starts again from here...
    ((2, 0.0, 0.1, 0.1, 190.9), 0),
    ((2, 0.0, 0.1, 0.1, 191.0), -1),   # ...and runs its 30 s
    ((1, 0.0, 0.0, 0.0, 300.0), 0),    # at min_proc_num: never below
    ((2, 0.1, 0.0, 0.0, 301.0), 0),    # a call waited: not low
    ((2, 0.0, 0.0, 0.0, 302.0), 0),
    ((2, 0.0, 0.0, 0.3, 333.0), 0),    # CPU above scale_down_busy: not low
    ((2, 0.0, 0.0, 0.0, 334.0), 0),
    ((2, 0.0, 0.0, 0.0, 364.0), -1),
]


def test_default_policy_scales_down_slowly():
    policy = DefaultPolicy(config())
    policy.started(0.0)
    assert [policy.decide(Signals(*row)) for row, _ in DEFAULT_DOWN] == [change for _, change in DEFAULT_DOWN]


def test_scaling_by_hand_restarts_the_low_load_timer_but_not_the_cooldown():
    policy = DefaultPolicy(config())
    policy.started(0.0)
    assert policy.decide(Signals(3, 0.0, 0.0, 0.0, 100.0)) == 0
    policy.scaled(120.0)   # speedysvc scale
    assert policy.decide(Signals(3, 0.0, 0.0, 0.0, 131.0)) == 0   # the timer started afresh at 131
    assert policy.decide(Signals(3, 0.0, 0.0, 0.0, 161.0)) == -1
    assert policy.decide(Signals(3, 2.0, 0.0, 0.0, 161.5)) == 1   # no cooldown was set by the scale


def test_fixed_policy_never_scales():
    policy = FixedPolicy(config())
    policy.started(0.0)
    assert {policy.decide(Signals(w, p, b, c, t)) for w, p, b, c, t in
            [(1, 9.0, 1.0, 1.0, 10.0), (4, 0.0, 0.0, 0.0, 500.0)]} == {0}


def test_policies_are_chosen_by_name_or_as_module_and_class(tmp_path):
    assert policy_class("default") is DefaultPolicy and policy_class("fixed") is FixedPolicy
    (tmp_path / "mypolicies.py").write_text(textwrap.dedent("""\
        class Burst:
            def __init__(self, cfg):
                self.cfg = cfg
            def started(self, now): pass
            def scaled(self, now): pass
            def decide(self, signals):
                return 2 if signals.pending else 0
    """))
    cls = policy_class("mypolicies:Burst", str(tmp_path))
    assert cls.__name__ == "Burst" and cls(config()).decide(Signals(1, 1.0, 0, 0, 0)) == 2
    (tmp_path / "halfpolicies.py").write_text("class OnlyDecides:\n    def decide(self, signals): return 0\n")
    for bad, says in [("fastest", "must be one of default, fixed"), ("nosuchmodule:X", "cannot import"),
                      ("mypolicies:Nope", "cannot import"), ("os:path", "no decide"),
                      ("halfpolicies:OnlyDecides", "has no started, scaled method")]:
        with pytest.raises(ValueError, match=says):
            policy_class(bad, str(tmp_path))
    assert str(tmp_path) not in sys.path   # (on the path only while the policy was imported)


def test_a_policy_of_the_users_is_imported_when_the_manager_starts_not_when_the_file_is_read(tmp_path):
    ini = tmp_path / "service.ini"
    ini.write_text("[Echo]\nimport_from=echo\nautoscale=nosuchpolicies:Policy\n")
    cfg = load(str(ini))   # (what `speedysvc status -c service.ini` does)
    with pytest.raises(ConfigError) as e:
        check_policies(cfg)
    assert str(e.value).startswith("service.ini, section [Echo], key autoscale: cannot import nosuchpolicies:Policy")


def test_service_ini_selects_the_policy_and_a_bad_one_names_file_section_and_key(tmp_path):
    ini = tmp_path / "service.ini"
    ini.write_text("[Echo]\nimport_from=echo\nautoscale=fixed\n[Other]\nimport_from=other\n")
    cfg = load(str(ini))
    assert [(s.section, s.autoscale) for s in cfg.services] == [("Echo", "fixed"), ("Other", "default")]
    assert isinstance(autoscale.make_policy(cfg.services[0]), FixedPolicy)
    ini.write_text("[Echo]\nimport_from=echo\nautoscale=quickly\n")
    with pytest.raises(ConfigError) as e:
        load(str(ini))
    assert str(e.value).startswith("service.ini, section [Echo], key autoscale: must be one of default, fixed")
    assert "'quickly'" in str(e.value)


def worker(pid, busy_ns_, busy=False, claim_ns=0):
    return {"pid": pid, "busy_ns": busy_ns_, "busy": busy, "claim_ns": claim_ns}


def test_busy_time_counts_the_calls_in_progress_up_to_now():
    registered = [worker(1, 100), worker(2, 50, busy=True, claim_ns=1_000), worker(3, 7, busy=True, claim_ns=0)]
    assert busy_ns(registered, now_ns=1_600) == 100 + 50 + 600 + 7
    assert busy_ns([worker(1, 5, busy=True, claim_ns=2_000)], now_ns=1_000) == 5   # (a clock read before the claim)


def test_the_load_meter_averages_waiting_calls_and_turns_busy_time_into_a_fraction():
    meter = LoadMeter()
    assert meter.measure([worker(1, 0)], now=10.0, now_ns=0) == (0.0, 0.0)   # nothing sampled; first busy reading
    for n in (0, 2, 4):
        meter.sample_pending(n)
    # two workers, 1.5 s of calls between them over 1 s: 75 % busy
    pending, busy = meter.measure([worker(1, 1_000_000_000), worker(2, 500_000_000)], now=11.0, now_ns=0)
    assert (pending, busy) == (2.0, 0.75)
    # busy never above 1; samples start afresh
    assert meter.measure([worker(1, 10_000_000_000), worker(2, 0)], now=12.0, now_ns=0) == (0.0, 1.0)


def test_the_watchdog_names_the_workers_over_call_timeout():
    ms = 1_000_000
    registered = [worker(1, 0, busy=True, claim_ns=0), worker(2, 0, busy=True, claim_ns=1500 * ms),
                  worker(3, 0, busy=False, claim_ns=0), worker(4, 0, busy=True, claim_ns=1000 * ms)]
    assert watchdog.overdue(registered, 1.0, now_ns=2001 * ms) == [4]   # (1: no claim time yet)
    assert watchdog.overdue(registered, 0.0, now_ns=10 ** 15) == []       # 0: no limit
