"""Flags: one the chosen mode would not read is refused in one line (not recorded in
args.json as if it had acted), and every flag the README's commands use is one the script's
--help lists."""
import os
import re
import shlex
import sys

import pytest

import common as C
import dgm
import dgr
import ewc_fewshot
import mergan_jtr
import mergan_ra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import table1  # noqa: E402

UNREAD = [  # (script, argv, the flag refused, the condition it names)
    (mergan_jtr, ["--mode", "jtr", "--ewc-lambda", "5"], "--ewc-lambda", "--mode ewc"),
    (mergan_jtr, ["--mode", "sft", "--fisher-samples", "9"], "--fisher-samples", "--mode ewc"),
    (mergan_jtr, ["--mode", "sft", "--jt-eval", "single-class"], "--jt-eval", "--mode jt"),
    (mergan_jtr, ["--mode", "jt", "--jtr-weighting", "batch"], "--jtr-weighting",
     "--mode jtr"),
    (mergan_jtr, ["--mode", "ewc", "--no-reduce-batch"], "--reduce-batch", "--mode jtr"),
    (mergan_jtr, ["--inception-fid"], "--inception-fid", "--final-metrics"),
    (mergan_ra, ["--no-ra-classifier", "--lambda-cls", "7"], "--lambda-cls",
     "--ra-classifier"),
    (mergan_ra, ["--no-final-metrics", "--inception-fid"], "--inception-fid",
     "--final-metrics"),
    (dgm, ["--replay", "none", "--replay-size", "5"], "--replay-size", "--replay generated"),
    (dgm, ["--val-split", "0", "--val-every", "5"], "--val-every", "--val-split"),
    (dgm, ["--to-32px", "pad"], "--to-32px", "28-px digits"),  # synth is 32 px
    (dgr, ["--inception-fid"], "--inception-fid", "--final-metrics"),
    (ewc_fewshot, ["--shots", "all", "--diversity-cap", "7"], "--diversity-cap", "--shots"),
    (ewc_fewshot, ["--shots", "all", "--diversity-samples", "70"], "--diversity-samples",
     "--shots"),
    (ewc_fewshot, ["--source-ckpt", "s.pt", "--source-iters", "7"], "--source-iters",
     "--source-ckpt")]


@pytest.mark.parametrize("script, argv, flag, when", UNREAD)
def test_a_flag_the_run_would_not_read_is_refused_in_one_line(script, argv, flag, when):
    with pytest.raises(C.UserError, match=f"^{flag} acts only .*{when}.*this run would "
                                          "ignore it: drop it$"):
        script.parse_args(["--dataset", "synth"] + argv if script is not ewc_fewshot
                          else argv)


def test_the_same_flags_where_they_are_read_are_accepted():
    assert mergan_jtr.parse_args(["--mode", "ewc", "--ewc-lambda", "5", "--fisher-samples",
                                  "10"]).ewc_lambda == 5
    assert mergan_jtr.parse_args(["--mode", "jt", "--jt-eval", "single-class"]).jt_eval == \
        "single-class"
    jtr = mergan_jtr.parse_args(["--mode", "jtr", "--jtr-weighting", "batch",
                                 "--no-reduce-batch", "--final-metrics", "--inception-fid"])
    assert (jtr.jtr_weighting, jtr.reduce_batch, jtr.final_metrics, jtr.inception_fid) == \
        ("batch", False, True, True)
    assert mergan_ra.parse_args(["--lambda-cls", "7"]).lambda_cls == 7
    assert mergan_ra.parse_args(["--dataset", "lsun", "--inception-fid"]).inception_fid
    assert dgm.parse_args(["--replay-size", "5", "--val-every", "5"]).replay_size == 5
    assert dgm.parse_args(["--dataset", "fashion", "--to-32px", "pad"]).to_32px == "pad"
    assert dgr.parse_args(["--dataset", "lsun", "--inception-fid"]).inception_fid
    few = ewc_fewshot.parse_args(["--diversity-cap", "7", "--source-iters", "7"])
    assert (few.diversity_cap, few.source_iters) == (7, 7)


SCRIPTS = {"mergan_jtr.py": mergan_jtr, "mergan_ra.py": mergan_ra, "dgm.py": dgm,
           "dgr.py": dgr, "ewc_fewshot.py": ewc_fewshot, "benchmarks/table1.py": table1}


def flags_of(module):
    """Every option string the script's parser accepts (what its --help lists)."""
    seen = {}

    class Spy(C.Parser):
        def parse_args(self, *a, **k):
            seen.update(self._option_string_actions)
            raise SystemExit
    real, C.Parser = C.Parser, Spy
    try:
        module.parse_args([])
    except SystemExit:
        pass
    finally:
        C.Parser = real
    return set(seen)


def test_every_flag_in_the_readme_commands_is_one_the_script_accepts():
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"`python (\S+\.py) ([^`]*)`", text)
    assert len(commands) > 15
    known = {name: flags_of(module) for name, module in SCRIPTS.items()}
    checked = 0
    for script, rest in commands:
        if script not in known:
            continue
        words = shlex.split(rest.replace("$root", "ROOT"))
        for w in words:
            if w.startswith("--") and " " not in w:  # not a pass-through's quoted value
                assert w.split("=")[0] in known[script], (script, w)
                checked += 1
    assert checked > 40
