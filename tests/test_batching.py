"""Data order and random draws are pure functions of (seed, step, position): independent of world size,
accumulation split, query order and restarts (bench/run/batching.py)."""

from __future__ import annotations

import pytest
import torch

from bench.run.batching import GlobalBatchPlan, derive_seed, flip_flags, sample_draws

NUM_SAMPLES, GLOBAL_BATCH, SEED = 20, 8, 3  # 8 does not divide 20: global batches straddle epoch boundaries


def gathered(plan: GlobalBatchPlan, step: int, world_size: int, accum: int) -> tuple[list[int], list[int]]:
    """What all ranks see at ``step``, concatenated in rank order then micro-step order."""
    indices, positions = [], []
    for rank in range(world_size):
        micro_batches = plan.micro_batches(step, rank, world_size, accum)
        assert len(micro_batches) == accum
        for mb in micro_batches:
            assert mb.step == step
            assert len(mb.indices) == len(mb.positions) == GLOBAL_BATCH // (world_size * accum)
            indices += mb.indices
            positions += mb.positions
    return indices, positions


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("accum", [1, 2])
def test_global_batch_does_not_depend_on_split(world_size, accum):
    reference = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    plan = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    for step in range(6):
        indices, positions = gathered(plan, step, world_size, accum)
        assert indices == reference.global_indices(step)
        assert positions == list(range(GLOBAL_BATCH))
        # ... and the same as the single-rank, no-accumulation run, element by element.
        assert (indices, positions) == gathered(reference, step, 1, 1)


def test_ranks_get_disjoint_contiguous_shares():
    plan = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    shares = [[p for mb in plan.micro_batches(0, rank, 4, 1) for p in mb.positions] for rank in range(4)]
    assert shares == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _concatenated(plan: GlobalBatchPlan, steps: int) -> list[int]:
    return [i for step in range(steps) for i in plan.global_indices(step)]


def test_every_epoch_is_a_permutation():
    plan = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    stream = _concatenated(plan, 10)  # 80 positions = 4 epochs
    epochs = [stream[e * NUM_SAMPLES:(e + 1) * NUM_SAMPLES] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_SAMPLES))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert epochs[0] != list(range(NUM_SAMPLES))  # shuffled at all


def test_steps_continue_across_epoch_boundaries():
    plan = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    stream = _concatenated(plan, 5)
    # Step 2 covers positions 16..23: the last 4 samples of epoch 0, then the first 4 of epoch 1.
    assert plan.global_indices(2) == stream[16:24]
    assert plan.global_indices(2)[:4] == stream[16:20] and plan.global_indices(2)[4:] == stream[20:24]
    assert plan.epoch_of(5) == pytest.approx(2.0)


def test_plan_is_a_pure_function_of_seed_and_step():
    sequential = _concatenated(GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED), 12)
    resumed = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)  # a restarted job asks for late steps first
    for step in (11, 0, 7, 3, 9, 1):
        assert resumed.global_indices(step) == sequential[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
    torch.manual_seed(12345)  # the global RNG plays no part
    assert GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED).global_indices(4) == resumed.global_indices(4)
    other_seed = _concatenated(GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED + 1), 12)
    assert other_seed != sequential


def test_empty_training_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchPlan(0, 8, 0)


# ---- per-sample draws -------------------------------------------------------------------------------------------

SHAPE, T, DROP = (3, 4, 4), 1000, 0.1


def _row(draws, i: int) -> tuple[torch.Tensor, ...]:
    row = (draws.noise[i], draws.timesteps[i], draws.drop_label[i])
    return row if draws.posterior_eps is None else (*row, draws.posterior_eps[i])


def _assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_draws_shapes_and_ranges():
    draws = sample_draws(SEED, 5, list(range(64)), SHAPE, T, DROP)
    assert draws.noise.shape == (64, *SHAPE) and draws.noise.dtype == torch.float32
    assert draws.timesteps.shape == (64,) and draws.timesteps.dtype == torch.int64
    assert draws.drop_label.shape == (64,) and draws.drop_label.dtype == torch.bool
    assert int(draws.timesteps.min()) >= 0 and int(draws.timesteps.max()) < T
    assert draws.posterior_eps is None
    with_posterior = sample_draws(SEED, 5, list(range(64)), SHAPE, T, DROP, posterior=True)
    assert with_posterior.posterior_eps.shape == (64, *SHAPE)


def test_draw_of_a_position_does_not_depend_on_its_companions():
    together = sample_draws(SEED, 7, [3, 5, 9], SHAPE, T, DROP)
    alone = sample_draws(SEED, 7, [5], SHAPE, T, DROP)
    reordered = sample_draws(SEED, 7, [9, 5], SHAPE, T, DROP)
    _assert_same(_row(together, 1), _row(alone, 0))
    _assert_same(_row(together, 1), _row(reordered, 1))
    _assert_same(_row(together, 2), _row(reordered, 0))
    torch.manual_seed(999)  # the global RNG plays no part
    _assert_same(_row(sample_draws(SEED, 7, [5], SHAPE, T, DROP), 0), _row(alone, 0))


def test_draws_split_like_micro_batches_match_the_whole_batch():
    whole = sample_draws(SEED, 2, list(range(GLOBAL_BATCH)), SHAPE, T, DROP)
    plan = GlobalBatchPlan(NUM_SAMPLES, GLOBAL_BATCH, SEED)
    for rank in range(2):
        for mb in plan.micro_batches(2, rank, 2, 2):
            part = sample_draws(SEED, mb.step, mb.positions, SHAPE, T, DROP)
            assert torch.equal(part.noise, whole.noise[mb.positions])
            assert torch.equal(part.timesteps, whole.timesteps[mb.positions])


def test_draws_differ_between_steps_positions_and_seeds():
    base = sample_draws(SEED, 4, [0, 1], SHAPE, T, DROP)
    assert not torch.equal(base.noise[0], base.noise[1])  # positions differ
    assert not torch.equal(base.noise, sample_draws(SEED, 5, [0, 1], SHAPE, T, DROP).noise)  # steps differ
    assert not torch.equal(base.noise, sample_draws(SEED + 1, 4, [0, 1], SHAPE, T, DROP).noise)  # seeds differ
    # (step, j) pairs are mixed, not summed: (4, 1) and (5, 0) are unrelated streams.
    assert not torch.equal(base.noise[1], sample_draws(SEED, 5, [0], SHAPE, T, DROP).noise[0])
    many = sample_draws(SEED, 0, list(range(256)), (1,), T, DROP)
    assert len(set(many.timesteps.tolist())) > 150  # timesteps are spread, not repeated


def test_draw_probabilities():
    draws = sample_draws(SEED, 0, list(range(2000)), (1,), T, DROP)
    assert 0.07 < draws.drop_label.float().mean().item() < 0.13
    assert abs(draws.noise.mean().item()) < 0.1 and 0.9 < draws.noise.std().item() < 1.1
    assert not sample_draws(SEED, 0, list(range(200)), (1,), T, 0.0).drop_label.any()
    assert sample_draws(SEED, 0, list(range(200)), (1,), T, 1.0).drop_label.all()


def test_posterior_noise_is_drawn_last_and_does_not_shift_the_other_draws():
    plain = sample_draws(SEED, 3, [0, 4], SHAPE, T, DROP)
    latent = sample_draws(SEED, 3, [0, 4], SHAPE, T, DROP, posterior=True)
    for i in range(2):
        _assert_same(_row(plain, i), _row(latent, i)[:3])
    assert not torch.equal(latent.posterior_eps, latent.noise)
    _assert_same(_row(latent, 1), _row(sample_draws(SEED, 3, [4], SHAPE, T, DROP, posterior=True), 0))


def test_flip_flags_are_per_position_and_balanced():
    together = flip_flags(SEED, 6, [2, 7, 11])
    assert together[1] == flip_flags(SEED, 6, [7])[0]
    assert flip_flags(SEED, 6, [11, 2]) == [together[2], together[0]]
    many = flip_flags(SEED, 0, list(range(2000)))
    assert all(type(f) is bool for f in many)
    assert 0.45 < sum(many) / len(many) < 0.55
    assert many != flip_flags(SEED, 1, list(range(2000)))  # other step, other flips
    assert many != flip_flags(SEED + 1, 0, list(range(2000)))


def test_derive_seed_mixes_its_parts():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(0, 0x7E57, step, j) for step in range(20) for j in range(20)}
    assert len(seeds) == 400  # no collisions between nearby (step, j)
    assert derive_seed(0, 1, 2) != derive_seed(0, 2, 1)  # order matters
    assert all(0 <= s < 2**63 for s in seeds)  # fits torch.Generator.manual_seed
