"""AttackSpec / parse / the attack registry: round trips and error messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgesep.attacks import ATTACKS, SPEC_SYNTAX, AttackSpec, get_attack, parse
from edgesep.errors import ConfigError, UnknownNameError

eps_st = st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)
specs = st.one_of(
    st.builds(AttackSpec, st.just("clean"), st.sampled_from(["linf", "l2", "L2"])),
    st.builds(AttackSpec, st.just("fgsm"), st.sampled_from(["linf", "l2"]), eps_st),
    st.builds(AttackSpec, st.just("autoattack"), st.sampled_from(["linf", "l2"]), eps_st),
    st.builds(
        AttackSpec,
        st.just("pgd"),
        st.sampled_from(["linf", "l2"]),
        eps_st,
        st.integers(1, 1000),
        st.one_of(st.none(), st.floats(1e-6, 1.0)),
        st.integers(1, 20),
    ),
)


@given(specs)
def test_string_round_trip(spec):
    assert parse(str(spec)) == spec


@given(specs)
def test_dict_round_trip_through_json(spec):
    assert AttackSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("clean", AttackSpec("clean")),
        (" CLEAN ", AttackSpec("clean")),
        ("fgsm:linf:0.1", AttackSpec("fgsm", "linf", 0.1)),
        ("pgd:linf:0.1:40", AttackSpec("pgd", "linf", 0.1, 40)),
        ("pgd:linf:0.1", AttackSpec("pgd", "linf", 0.1, 10)),
        ("PGD:Linf:8/255:20", AttackSpec("pgd", "linf", 8 / 255, 20)),
        ("pgd:l2:0.5:40:restarts=5", AttackSpec("pgd", "l2", 0.5, 40, None, 5)),
        ("pgd:l2:0.5:step_size=0.1:steps=7", AttackSpec("pgd", "l2", 0.5, 7, 0.1)),
        ("autoattack:linf:0.1", AttackSpec("autoattack", "linf", 0.1)),
    ],
)
def test_parse_examples(text, expected):
    spec = parse(text)
    assert spec == expected
    assert parse(str(spec)) == spec


def test_normalized_fields():
    assert AttackSpec("fgsm", eps=0.1).steps == 1
    assert AttackSpec("pgd", eps=0.1).steps == 10
    assert AttackSpec("autoattack", eps=0.1).steps is None
    clean = AttackSpec("clean")
    assert (clean.eps, clean.steps, clean.step_size, clean.restarts) == (0.0, None, None, 1)
    assert AttackSpec("pgd", "L2", eps=1).norm == "l2" and isinstance(AttackSpec("pgd", eps=1).eps, float)
    assert AttackSpec("pgd", eps=0.1, steps=40).effective_step_size() == pytest.approx(2.5 * 0.1 / 40)
    assert AttackSpec("pgd", eps=0.1, step_size=0.01).effective_step_size() == 0.01
    assert AttackSpec("fgsm", eps=0.1).effective_step_size() is None
    assert str(AttackSpec("pgd", eps=0.25, steps=40, restarts=3)) == "pgd:linf:0.25:40:restarts=3"


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "unknown attack ''"),
        ("foo:linf:0.1", "unknown attack 'foo'.*valid attacks: clean, autoattack, fgsm, pgd"),
        ("pgd", "needs at least a norm and an eps"),
        ("pgd:linf", "needs at least a norm and an eps"),
        ("pgd:linf:abc", "eps 'abc' is not a number"),
        ("pgd:linf:1/0", "eps '1/0' is not a number"),
        ("pgd:linf:-0.1", "eps must be a finite number >= 0"),
        ("pgd:linf:inf", "eps must be a finite number >= 0"),
        ("pgd:l3:0.1", "unknown norm 'l3'"),
        ("pgd:linf:0.1:x", "steps 'x' is not an integer"),
        ("pgd:linf:0.1:0", "steps must be an integer >= 1"),
        ("pgd:linf:0.1:10:restarts=0", "restarts must be"),
        ("pgd:linf:0.1:10:bogus=1", "unexpected part 'bogus=1'"),
        ("pgd:linf:0.1:10:20", "unexpected part '20'"),
        ("pgd:linf:0.1:10:steps=5", "steps is given twice"),
        ("pgd:linf:0.1:step_size=0", "step_size must be a finite number > 0"),
        ("fgsm:linf:0.1:5", "fgsm takes exactly one step"),
        ("fgsm:linf:0.1:restarts=2", "fgsm takes no step_size or restarts"),
        ("autoattack:linf:0.1:100", "autoattack chooses its own iterations"),
        ("clean:0.1", "'clean' takes no arguments"),
    ],
)
def test_parse_errors_show_the_syntax(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse(text)
    assert SPEC_SYNTAX in str(info.value)


def test_parse_rejects_non_strings():
    with pytest.raises(ConfigError, match="must be a string"):
        parse(0.1)  # type: ignore[arg-type]


def test_constructor_errors():
    with pytest.raises(UnknownNameError, match="unknown attack 'cw'"):
        AttackSpec("cw", eps=0.1)
    with pytest.raises(ConfigError, match="eps is required"):
        AttackSpec("pgd")
    with pytest.raises(ConfigError, match="eps must be"):
        AttackSpec("pgd", eps=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'clean' takes no eps"):
        AttackSpec("clean", eps=0.1)
    with pytest.raises(ConfigError, match="restarts must be"):
        AttackSpec("pgd", eps=0.1, restarts=1.5)  # type: ignore[arg-type]


def test_from_dict_errors():
    with pytest.raises(ConfigError, match="unknown attack spec keys \\['seed'\\]"):
        AttackSpec.from_dict({"name": "pgd", "eps": 0.1, "seed": 1})
    with pytest.raises(ConfigError, match="has no 'name'"):
        AttackSpec.from_dict({"eps": 0.1})
    with pytest.raises(ConfigError, match="must be a mapping"):
        AttackSpec.from_dict(["pgd"])  # type: ignore[arg-type]


def test_spec_is_frozen_and_hashable():
    spec = AttackSpec("pgd", eps=0.1)
    with pytest.raises(AttributeError):
        spec.eps = 0.2  # type: ignore[misc]
    assert len({spec, parse("pgd:linf:0.1:10")}) == 1


def test_registry():
    assert sorted(ATTACKS) == ["autoattack", "fgsm", "pgd"] and len(ATTACKS) == 3
    assert "square" not in ATTACKS
    from edgesep.attacks import autoattack, fgsm, pgd

    assert get_attack("pgd") is pgd and get_attack("fgsm") is fgsm and get_attack("autoattack") is autoattack
    with pytest.raises(UnknownNameError, match="unknown attack 'cw'; valid attacks: autoattack, fgsm, pgd"):
        get_attack("cw")
    assert ATTACKS.get("cw") is None
