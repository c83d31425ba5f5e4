"""Client-level differential privacy: Flower's DP wrapper and mod, and its Rényi-DP accountant.

Each sampled client's update (new weights - global weights) is clipped to L2 norm `dp_clip` on the client
(Flower's `fixedclipping_mod`), the server averages the clipped updates and adds Gaussian noise of standard
deviation `dp_noise * dp_clip / clients_per_round` (Flower's `DifferentialPrivacyClientSideFixedClipping`).
That is the Gaussian mechanism on the sum of updates with sensitivity `dp_clip`: the guarantee is about a
whole client (all of its data), not a single document. Flower's `RdpAccountant` (backed by Google's
dp-accounting) composes one release per round and reports epsilon at `dp_delta`. Sampling is counted without
amplification (every round is charged in full), the conservative reading when the sampling is not Poisson.
"""

from __future__ import annotations

from typing import Any

from leantrain.config import FederatedConfig
from leantrain.errors import ConfigError


def _accountant(clients: int, delta: float) -> Any:
    try:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=clients,
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError as e:
        raise ConfigError(f"differential privacy needs the dp-accounting package ({e}); install it with "
                          "`pip install 'leantrain[federated]'` or turn federated.dp_noise off") from None


def epsilon(noise: float, rounds: int, per_round: int, clients: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases with noise multiplier `noise`."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    acc = _accountant(clients, delta)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=per_round, population_size=clients),
                count=rounds)
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target: float, rounds: int, per_round: int, clients: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon after `rounds` is at most `target` (bisection:
    epsilon falls as the noise grows)."""
    lo, hi = 1e-3, 1.0
    while epsilon(hi, rounds, per_round, clients, delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"federated.dp_epsilon = {target} cannot be reached in {rounds} rounds at dp_delta = "
                              f"{delta}; raise dp_epsilon or lower the rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon(mid, rounds, per_round, clients, delta) > target:
            lo = mid
        else:
            hi = mid
    return hi


def noise_multiplier(f: FederatedConfig) -> float:
    """The noise multiplier the run uses: dp_noise, or the one solved for dp_epsilon (0: DP off)."""
    per_round = f.clients_per_round or f.clients
    if f.dp_epsilon:
        return noise_for_epsilon(f.dp_epsilon, f.rounds, per_round, f.clients, f.dp_delta)
    return f.dp_noise


def wrap(strategy: Any, f: FederatedConfig, noise: float) -> Any:
    """Flower's client-side fixed-clipping DP wrapper around `strategy`, with an accountant attached."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=noise, clipping_norm=f.dp_clip,
                                                      num_sampled_clients=f.clients_per_round or f.clients,
                                                      accountant=_accountant(f.clients, f.dp_delta))
