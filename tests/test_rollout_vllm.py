"""The vLLM rollout backend (grpo/rollout_vllm.py) without vLLM: a fake `vllm` module in sys.modules records what the
backend asks of it (engine arguments, requests and their seeds, weight loads, sleep/wake), so the parts that do not need
a GPU are checked here: token ids -> Rollout, EOS masks, a weight sync before each rollout that follows an update,
lazy import (choosing hf never imports vllm), and the error when vLLM is missing (naming the `gpu` extra, raised before
any model loads). The real engine runs in tests/test_gpu_scale.py, on a CUDA machine with vLLM only."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.config import GRPOConfig, VLLMConfig
from grpo.rollout import SamplingParams, completion_seed, mix_seed
from grpo.rollout_vllm import VLLMNotInstalledError, rollout_from_token_ids
from grpo.trainer import GRPOTrainer
from stages.core.tasks import clean_trace, make_problems
from stages.core.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    problems = make_problems("addition", 100, seed=0)
    return train_tokenizer([f"User: {p.question}\nAssistant:{clean_trace(p)}" for p in problems], vocab_size=320)


@pytest.fixture(scope="module")
def dataset():
    return [{"prompt": f"User: {p.question}\nAssistant:"} for p in make_problems("addition", 16, 1)]


@pytest.fixture
def policy_dir(tok, tiny_model, tmp_path):
    """A tiny policy saved to a directory and loaded back, as stages load it (vLLM reads the architecture there)."""
    tiny_model(tok).save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


class FakeVLLM:
    """What the backend uses of vLLM, recording every call in `events`."""

    def __init__(self, tok):
        self.tok, self.events, self.llms = tok, [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class LLM:
            def __init__(self, **kw):
                fake.llms.append(self)
                self.kwargs = kw
                model = types.SimpleNamespace(load_weights=lambda weights: fake.events.append(
                    ("load", [(n, t.detach().clone()) for n, t in weights])))
                runner = types.SimpleNamespace(model=model)
                self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(model_runner=runner)))

            def generate(self, requests, sampling_params, use_tqdm=True):
                fake.events.append(("generate", requests, sampling_params))
                out = []
                for k, (req, sp) in enumerate(zip(requests, sampling_params)):
                    ids = [5 + (k % 7)] * (1 + k % sp.max_tokens)  # never the EOS id
                    stop = k % 3 != 2  # every third request runs into max_tokens
                    if stop:
                        ids = ids[: sp.max_tokens - 1] + [fake.tok.eos_token_id]
                    else:
                        ids = [5] * sp.max_tokens
                    reason = "stop" if stop else "length"
                    out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids,
                                                                                     finish_reason=reason)]))
                return out

            def reset_prefix_cache(self):
                fake.events.append(("reset_prefix_cache",))

            def sleep(self, level=1):
                fake.events.append(("sleep", level))

            def wake_up(self, tags=None):
                fake.events.append(("wake_up", tuple(tags or ())))

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams

    def kinds(self):
        return [e[0] for e in self.events]


@pytest.fixture
def fake_vllm(tok, monkeypatch):
    fake = FakeVLLM(tok)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def vllm_config(**kw) -> GRPOConfig:
    base = {"prompts_per_step": 2, "num_generations": 3, "steps_per_iteration": 2, "beta": 0.0,
            "learning_rate": 1e-2, "max_prompt_length": 32, "max_completion_length": 6, "rollout_backend": "vllm",
            "rollout_seeding": "prompt", "vllm": VLLMConfig(gpu_memory_utilization=0.25)}
    return GRPOConfig(**{**base, **kw})


def test_token_ids_become_a_rollout_with_eos_masks(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = ["User: 1+2=?\nAssistant:", "User: 10+20=?\nAssistant:"]
    from grpo.rollout import HFGenerateBackend

    prompt_ids, prompt_mask = HFGenerateBackend(None, tok).tokenize_prompts(prompts)
    completions = [[7, 8, eos], [7, 8, 9, 10], [eos], [9, 9]]  # 2 prompts x G=2
    stopped_on = [eos, None, eos, eos]  # the last stopped without its EOS in the ids: it gets one
    r = rollout_from_token_ids(tok, prompts, 2, prompt_ids, prompt_mask, completions, stopped_on)
    assert r.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    assert torch.equal(r.prompt_ids, prompt_ids.repeat_interleave(2, dim=0))
    assert r.completion_ids.tolist() == [[7, 8, eos, pad], [7, 8, 9, 10], [eos, pad, pad, pad], [9, 9, eos, pad]]
    assert r.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert r.truncated.tolist() == [False, True, False, False]
    assert r.lengths.tolist() == [3, 4, 1, 3]
    assert r.completions[2] == ""  # EOS alone decodes to nothing
    assert r.input_ids.shape == (4, prompt_ids.shape[1] + 4)


def test_vllm_rows_end_at_any_eos_id_and_get_one_only_when_it_was_sampled(tok):
    """Two EOS ids (the tokenizer's and a second one from the generation config, 11): a row ends at the first of either;
    an EOS drawn as the last allowed token (finish_reason "length") still ends it; an EOS is appended only for a
    request that stopped on one the engine left out, never to one that ran into max_tokens."""
    from types import SimpleNamespace as Out

    from grpo.rollout import HFGenerateBackend
    from grpo.rollout_vllm import stop_token

    eos, pad = tok.eos_token_id, tok.pad_token_id
    eos_ids = [eos, 11]
    prompts = ["User: 1+2=?\nAssistant:", "User: 10+20=?\nAssistant:"]
    prompt_ids, prompt_mask = HFGenerateBackend(None, tok).tokenize_prompts(prompts)
    outputs = [Out(token_ids=[7, 11], finish_reason="stop", stop_reason=11),  # stopped on the second EOS id
               Out(token_ids=[7, 8, eos], finish_reason="length", stop_reason=None),  # EOS at max length
               Out(token_ids=[9, 9], finish_reason="stop", stop_reason=11),  # stop token left out of the ids
               Out(token_ids=[5, 5, 5], finish_reason="length", stop_reason=None)]  # truncated
    stopped_on = [stop_token(o, eos_ids) for o in outputs]
    assert stopped_on == [11, None, 11, None]
    r = rollout_from_token_ids(tok, prompts, 2, prompt_ids, prompt_mask, [o.token_ids for o in outputs], stopped_on,
                               eos_ids)
    assert r.completion_ids.tolist() == [[7, 11, pad], [7, 8, eos], [9, 9, 11], [5, 5, 5]]
    assert r.lengths.tolist() == [2, 3, 3, 3]
    assert r.truncated.tolist() == [False, False, False, True]


def test_weights_synced_before_each_rollout_after_an_update(tok, dataset, policy_dir, fake_vllm):
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = vllm_config()
    trainer = GRPOTrainer(policy, tok, cfg, dataset, [("len", length_reward, 1.0)], progress=False)
    (llm,) = fake_vllm.llms
    assert llm.kwargs["model"] == str(policy_dir) and llm.kwargs["skip_tokenizer_init"]
    assert llm.kwargs["gpu_memory_utilization"] == 0.25 and llm.kwargs["max_model_len"] == 32 + 6
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert not llm.kwargs["enable_sleep_mode"]

    trainer.train()
    # one sync (every parameter) before each of the 2 rollouts: the first one, and the one after step 1's update
    kinds = [k for k in fake_vllm.kinds() if k != "reset_prefix_cache"]
    n_params = len(list(policy.named_parameters()))
    assert kinds == ["load"] * n_params + ["generate"] + ["load"] * n_params + ["generate"]
    loads = [e[1][0] for e in fake_vllm.events if e[0] == "load"]
    first, second = dict(loads[:n_params]), dict(loads[n_params:])
    assert all(torch.equal(first[n], start[n]) for n in start)  # the weights vLLM started from
    assert any(not torch.equal(second[n], start[n]) for n in start)  # after the update: the new ones
    gens = [e for e in fake_vllm.events if e[0] == "generate"]
    assert len(gens[0][1]) == 2 * 3  # B x G requests, one SamplingParams each
    sp = gens[1][2][0]
    assert sp.n == 1 and sp.max_tokens == 6 and sp.stop_token_ids == [tok.eos_token_id] and sp.temperature == 1.0
    assert trainer.backend.eos_ids == [tok.eos_token_id]
    # requests carry the prompts' token ids without padding, seeded per completion from (seed, step, position)
    known = {tuple(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in dataset}
    sent = [tuple(r["prompt_token_ids"]) for r in gens[0][1]]
    assert set(sent) <= known and sent[0] == sent[1] == sent[2] and sent[3] == sent[4] == sent[5]
    step1_seeds = [p.seed for p in gens[1][2]]
    assert step1_seeds == [completion_seed(mix_seed(cfg.seed, 1, i), j) for i in range(2) for j in range(3)]


def test_sleep_mode_releases_and_reloads(tok, dataset, policy_dir, fake_vllm):
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    cfg = vllm_config(steps_per_iteration=1, vllm=VLLMConfig(sleep=True))
    GRPOTrainer(policy, tok, cfg, dataset, [("len", length_reward, 1.0)], progress=False).train()
    kinds = [k for k in fake_vllm.kinds() if k not in ("load", "reset_prefix_cache")]
    assert fake_vllm.llms[0].kwargs["enable_sleep_mode"]
    assert kinds == ["sleep", "wake_up", "wake_up", "generate", "sleep"]
    wakes = [e[1] for e in fake_vllm.events if e[0] == "wake_up"]
    assert wakes == [("weights",), ("kv_cache",)]


class _NoVLLM(importlib.abc.MetaPathFinder):
    """Fails the test if anything imports vllm."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise AssertionError(f"{name} was imported")


def test_choosing_hf_never_imports_vllm(tok, dataset, policy_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoVLLM(), *sys.meta_path])
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    cfg = vllm_config(rollout_backend="hf", steps_per_iteration=1)
    GRPOTrainer(policy, tok, cfg, dataset, [("len", length_reward, 1.0)], progress=False).train()
    assert "vllm" not in sys.modules


def _without_vllm(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k))


def test_vllm_missing_fails_naming_the_gpu_extra_before_the_model_is_touched(tok, dataset, monkeypatch):
    _without_vllm(monkeypatch)

    class Untouchable(torch.nn.Module):
        def parameters(self, *a, **k):
            raise AssertionError("the model was touched")

    with pytest.raises(VLLMNotInstalledError, match=r"gpu.*extra|extra.*gpu") as e:
        GRPOTrainer(Untouchable(), tok, vllm_config(), dataset, [("len", length_reward, 1.0)], progress=False)
    assert "pip install -e '.[gpu]'" in str(e.value)


def test_a_vllm_stage_without_vllm_fails_before_loading_its_model(mini_recipe, monkeypatch):
    """The stage checks before it opens its MLflow run or loads anything."""
    from stages import r1_zero

    _without_vllm(monkeypatch)
    monkeypatch.setattr("stages.core.grpo_runner.load_model_and_tokenizer",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("stages.core.grpo_runner.stage_context", lambda *a, **k: pytest.fail("an MLflow run was opened"))
    recipe = mini_recipe.model_copy(update={"r1_zero": mini_recipe.r1_zero.model_copy(update={
        "grpo": mini_recipe.r1_zero.grpo.model_copy(update={"rollout_backend": "vllm"})})})
    with pytest.raises(VLLMNotInstalledError, match="gpu"):
        r1_zero.run(recipe, {"model": "/nonexistent/model"}, progress=False)


def test_hf_backend_samples_the_same_completions_whatever_the_batch(tok, policy_dir):
    """Seeded sampling (rollout_seeding=prompt): a prompt's completions do not depend on its batch or rank."""
    from grpo.rollout import HFGenerateBackend

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    backend = HFGenerateBackend(model, tok)
    prompts = [f"User: {a}+{b}=?\nAssistant:" for a, b in ((1, 2), (13, 24), (5, 60), (7, 7))]
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    whole = backend.generate(prompts, 3, sampling, seeds=[1, 2, 3, 4])
    halves = [backend.generate(prompts[:2], 3, sampling, seeds=[1, 2]),
              backend.generate(prompts[2:], 3, sampling, seeds=[3, 4])]
    assert whole.completions == halves[0].completions + halves[1].completions
    assert len(set(whole.completions)) > 6  # still sampling: the G completions of a prompt differ
    other = backend.generate(prompts, 3, sampling, seeds=[9, 2, 3, 4])
    assert other.completions[3:] == whole.completions[3:] and other.completions[:3] != whole.completions[:3]


def test_seeded_sampling_draws_from_the_softmax():
    """Gumbel-max over temperature-scaled logits: the frequencies match softmax(logits / T)."""
    from grpo.rollout import SeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    n, T = 4000, 1.5
    proc = SeededSampling(list(range(n)), temperature=T, top_p=1.0, device="cpu")
    picks = proc(None, logits.expand(n, -1)).argmax(dim=1)
    freq = torch.bincount(picks, minlength=5).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / T, dim=0), atol=0.03)
    nucleus = SeededSampling(list(range(n)), temperature=1.0, top_p=0.5, device="cpu")
    assert set(nucleus(None, logits.expand(n, -1)).argmax(dim=1).tolist()) == {0}  # p(0) = 0.64 >= top_p
