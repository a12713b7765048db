"""The denoising loop against transformers' ``generate``, step by step at the spec's schedule (t 0.8 -> 0.4).

dgemma draws from per-row CPU generators with inverse-CDF sampling, transformers from the global RNG with
``torch.multinomial``. To compare the loops rather than the RNGs, dgemma runs first and its draws are
replayed into transformers at its two draw sites: ``EntropyBoundSampler.initialize_canvas`` (a canvas's
starting tokens, and the re-noise tokens after each step) and ``torch.multinomial`` (the samples). Each
replayed sample is checked to be the inverse CDF of transformers' own distribution at dgemma's uniform, so
the samples are not taken on trust. Then, for every row, canvas and step: the temperature, the token
entropies, the accepted positions, the next canvas (accepted samples kept, the others re-noised), the
argmax draft, the stopping decision, the steps per canvas, and the committed tokens.

Decisions are compared exactly, so the test also checks that none of them sits near its boundary. The two
implementations' tempered logits differ by fp32 rounding that the self-conditioning chain compounds over
the steps of a canvas (dgemma runs the rows batched, transformers one by one): typically 1e-4, at worst
9e-4 (torch 2.13 on a 2-core AMD EPYC, AVX2), their entropies by up to 1e-4 nats. Entropy decisions must
therefore be ENTROPY_MARGIN from their boundary and argmax leads LOGIT_MARGIN; the seeds were chosen so
that the nearest ones are 9.7e-4 nats and 7.6e-3 away, far beyond what another CPU's rounding could move.
"""

import pytest
import torch

import dgemma
from dgemma import core, denoise, sampler
from dgemma.params import SamplingParams

STEPS = 10
PROMPTS = [[2, 17, 99, 4], [2, *range(300, 319)], [2, 7]]  # the second is longer than the sliding window (16)
CASES = {
    # the spec's defaults: few positions accepted per step, most re-noised; this random model never settles
    "spec": {"entropy_bound": 0.1, "confidence_threshold": 0.005, "seed": 7},
    # a looser bound fills the canvas with samples: drafts stabilise and some canvases stop early
    "early stops": {"entropy_bound": 3.0, "confidence_threshold": 0.15, "seed": 2},
}
ENTROPY_MARGIN = 5e-4  # nats: entropy sums against the bound, mean entropies against the threshold
LOGIT_MARGIN = 2e-3  # tempered logits: the argmax's lead over the runner-up


@pytest.fixture(scope="module")
def models(ckpt_factory, hf_model_factory):
    path = ckpt_factory("tiny")
    return dgemma.load(path, dtype=torch.float32).model, hf_model_factory(path)


def _dgemma_steps(model, params, monkeypatch):
    """Run dgemma's sampler; per (row, canvas, step from 1): its decoder input, temperature, uniforms,
    samples, entropies, accepted mask and draft. Also the per-row results."""
    calls = []
    decode_hidden, step_fused = model.decode_hidden, denoise.step_fused

    def spy_decode(canvas, cache, soft=None):
        calls.append({"x": canvas.clone()})  # [n active rows, C]
        return decode_hidden(canvas, cache, soft)

    def spy_step(m, h, temperature, u, **kw):
        out = step_fused(m, h, temperature, u, **kw)
        calls[-1].update(T=temperature, u=u.clone(), sampled=out.sampled.clone(), entropy=out.entropy.clone())
        return out

    steps, seen, k = {}, 0, 0
    with monkeypatch.context() as mp:
        mp.setattr(model, "decode_hidden", spy_decode)
        mp.setattr(denoise, "step_fused", spy_step)
        loop = core.run(model, PROMPTS, params)
        while True:
            try:
                ev = next(loop)
            except StopIteration as stop:
                results = stop.value
                break
            if not isinstance(ev, core.StepEvent):
                continue
            if len(calls) != seen:  # a new decoder pass: its rows come in order
                seen, k = len(calls), 0
            call = calls[-1]
            steps[ev.request_id, ev.canvas, ev.step] = {
                "x": call["x"][k], "T": float(call["T"][k]) if torch.is_tensor(call["T"]) else call["T"], "u": call["u"][k], "sampled": call["sampled"][k],
                "entropy": call["entropy"][k], "accept": torch.tensor(ev.accepted_mask), "draft": ev.draft,
                "mean_entropy": ev.mean_entropy}
            k += 1
    return steps, results


def _transformers_steps(hf, row, steps, case, monkeypatch):
    """Run transformers' generate for one row with dgemma's draws; per step, what its loop saw and did."""
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    c = hf.config.canvas_length
    log, state = [], {"canvas": -1, "step": 0, "renoise": False, "pending": {}}

    def tokens(key):  # dgemma's decoder input at that step; a step dgemma never ran needs no real tokens
        return steps[key]["x"][None] if key in steps else torch.zeros(1, c, dtype=torch.long)

    def initialize_canvas(self, batch_size, device):
        assert batch_size == 1
        if state["renoise"]:  # after a step: the noise that dgemma put in the next step's canvas
            state["renoise"] = False
            log[-1]["accept"] = self.accepted_token_mask[0].clone()
            return tokens((row, state["canvas"], state["step"] + 1))
        state["canvas"], state["step"] = state["canvas"] + 1, 0
        return tokens((row, state["canvas"], 1))

    def multinomial(probs, num_samples, *args, **kw):
        state["step"] += 1
        state["renoise"] = True
        key = (row, state["canvas"], state["step"])
        assert key in steps, f"transformers ran step {key}, dgemma did not"
        log.append({"key": key, "probs": probs.double(), **state["pending"]})
        return steps[key]["sampled"].view(-1, 1)

    temperature_call = gen.LinearTemperatureScheduleLogitsProcessor.__call__

    def temperature(self, input_ids, scores, cur_step):
        out = temperature_call(self, input_ids, scores, cur_step)
        state["pending"]["T"] = float(scores.double().abs().sum() / out.double().abs().sum())  # scores / T
        state["pending"]["logits"] = out[0].double()  # [C, V] tempered
        return out

    stop_call = gen.StableAndConfidentStoppingCriteria.__call__

    def stopping(self, argmax_canvas, logits, **kw):
        out = stop_call(self, argmax_canvas, logits, **kw)
        log[-1].update(stop=bool(out[0]), draft=argmax_canvas[0].tolist())
        return out

    forward = hf.forward

    def decoder_input(*args, **kw):
        state["pending"]["x"] = kw["decoder_input_ids"][0].clone()
        return forward(*args, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(gen.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
        mp.setattr(torch, "multinomial", multinomial)
        mp.setattr(gen.LinearTemperatureScheduleLogitsProcessor, "__call__", temperature)
        mp.setattr(gen.StableAndConfidentStoppingCriteria, "__call__", stopping)
        mp.setattr(hf, "forward", decoder_input)
        prompt = torch.tensor([PROMPTS[row]])
        out = hf.generate(prompt, max_new_tokens=3 * c, max_denoising_steps=STEPS, t_max=0.8, t_min=0.4,
                          stability_threshold=1, confidence_threshold=case["confidence_threshold"],
                          sampler_config=gen.EntropyBoundSamplerConfig(entropy_bound=case["entropy_bound"]),
                          eos_token_id=None, pad_token_id=None)
    return log, out.sequences[0, prompt.shape[1]:].tolist()


def _check_margins(steps, case):
    """No entropy decision of this run near its boundary (see the module docstring): accepted prefixes
    against the entropy bound, mean entropies against the confidence threshold."""
    for key, s in steps.items():
        h = s["entropy"].double().sort().values
        assert ((h.cumsum(0) - h) - case["entropy_bound"]).abs().min() > ENTROPY_MARGIN, f"{key}: near the bound"
        assert abs(s["mean_entropy"] - case["confidence_threshold"]) > ENTROPY_MARGIN, f"{key}: near the threshold"


def _check_renoising(steps):
    """The positions a step did not accept enter the next step as fresh uniform tokens: they rarely equal
    that position's sample or its previous token (1 in 512 by chance)."""
    kept = total = 0
    for (row, canvas, step), s in steps.items():
        nxt = steps.get((row, canvas, step + 1))
        if nxt is not None:
            noised = ~s["accept"]
            same = (nxt["x"] == s["sampled"]) | (nxt["x"] == s["x"])
            kept, total = kept + int((same & noised).sum()), total + int(noised.sum())
    assert total > 200 and kept / total < 0.02


def _check_step(ref: dict, ours: dict, step: int, where: str) -> None:
    """One step of one row: transformers' view (``ref``) against dgemma's (``ours``)."""
    assert ref["x"].tolist() == ours["x"].tolist(), where  # accepted samples kept, the rest re-noised
    assert ours["T"] == pytest.approx(ref["T"], rel=1e-6), where
    assert ours["T"] == pytest.approx(0.4 + 0.4 * (STEPS + 1 - step) / STEPS), where  # t_max down to t_min
    # dgemma's sample is the inverse CDF of transformers' distribution at dgemma's uniform
    probs, tok = ref["probs"], ours["sampled"][:, None]  # [C, V], [C, 1]
    upper = probs.cumsum(-1).gather(1, tok)[:, 0]  # [C]
    lower = upper - probs.gather(1, tok)[:, 0]
    target = ours["u"].double() * probs.sum(-1)
    assert (probs.gather(1, tok) > 0).all(), where
    assert ((lower - 1e-5 <= target) & (target <= upper + 1e-5)).all(), where
    entropy = torch.distributions.Categorical(logits=ref["logits"]).entropy()  # [C]
    torch.testing.assert_close(ours["entropy"].double(), entropy, rtol=0, atol=ENTROPY_MARGIN, msg=where)
    assert ref["accept"].tolist() == ours["accept"].tolist(), where
    top2 = ref["logits"].topk(2, dim=-1).values  # [C, 2]
    assert (top2[:, 0] - top2[:, 1]).min() > LOGIT_MARGIN, f"{where}: an argmax near-tie"
    assert ref["draft"] == ours["draft"], where


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_transformers_step_by_step(models, monkeypatch, case):
    model, hf = models
    cfg, kw = model.cfg, CASES[case]
    params = SamplingParams(max_new_tokens=3 * cfg.canvas_length, max_denoising_steps=STEPS, t_max=0.8,
                            t_min=0.4, stability_threshold=1, eos_token_id=(), **kw)
    steps, results = _dgemma_steps(model, params, monkeypatch)
    _check_margins(steps, kw)
    _check_renoising(steps)
    stopped_early = 0
    for row in range(len(PROMPTS)):
        log, tokens = _transformers_steps(hf, row, steps, kw, monkeypatch)
        assert [e["key"] for e in log] == [k for k in steps if k[0] == row]  # the same steps, in order
        for ref in log:
            ours, (_, canvas, step) = steps[ref["key"]], ref["key"]
            where = f"row {row}, canvas {canvas}, step {step}"
            _check_step(ref, ours, step, where)
            last = step == results[row].steps[canvas]
            if step < STEPS:  # the last possible step ends the canvas whatever the rule says
                assert ref["stop"] == last, where
                stopped_early += last
        assert tokens == results[row].token_ids  # the committed canvases, hence the contexts of later ones
    if case == "early stops":
        assert stopped_early >= 2  # the stopping rule, not the step budget, ended some canvases
    assert {step for (_, _, step) in steps} == set(range(1, STEPS + 1))
