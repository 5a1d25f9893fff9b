"""Picks per pass of the streaming launch 2's multi-pick fill (a CPU simulation of its rule).

    python bench/multipick_sim.py

Each pass of the streaming launch 2 reads all N x D features once. It takes the m tokens with
the largest fill keys as candidates and the (m + 1)-th key as a bound on every other token's
key, then confirms picks one at a time as the rule makes them: the best candidate (keys lowered
by the picks confirmed so far) while its key beats the bound (``kernels/fill.py``,
``_confirm``). This walks that rule in float64 on random and clustered tokens and prints the
fill picks per pass for several m: the factor by which a pass per pick is cut
(``kernels/model.py`` uses the m = 16 column).
"""
import torch


def picks_per_pass(tokens: torch.Tensor, keep: int, widths=(8, 16, 32)) -> dict:
    """{m: fill picks / passes} for a fill of ``keep`` picks after token 0 over tokens [N, D]."""
    unit = (tokens / tokens.norm(dim=1, keepdim=True)).double()
    rates = {}
    for m in widths:
        fill = torch.minimum(torch.full((len(unit),), float("inf"), dtype=torch.float64),
                             1 - unit @ unit[0])
        fill[0] = float("-inf")
        picks, passes = 1, 0
        while picks < keep:
            passes += 1
            order = torch.argsort(-fill, stable=True)[: m + 1]  # (key, lower index) order
            candidates, bound = order[:m], int(order[m]) if len(order) > m else None
            keys = fill[candidates].clone()
            chosen = []
            while picks < keep:
                best = max(range(len(candidates)),
                           key=lambda j: (keys[j].item(), -int(candidates[j])))
                beats = bound is None or ((keys[best].item(), -int(candidates[best]))
                                          > (fill[bound].item(), -bound))
                if keys[best] == float("-inf") or not beats:
                    break
                pick = candidates[best]
                chosen.append(pick)
                picks += 1
                keys = torch.minimum(keys, 1 - unit[candidates] @ unit[pick])
                keys[[candidates.tolist().index(c) for c in chosen]] = float("-inf")
            for pick in chosen:
                fill = torch.minimum(fill, 1 - unit @ unit[pick])
            fill[torch.tensor(chosen, dtype=torch.long)] = float("-inf")
        rates[m] = (keep - 1) / passes
    return rates


def main() -> None:
    torch.set_num_threads(1)
    for name, n, keep in (("LLaVA-1.5", 576, 32), ("LLaVA-NeXT", 2880, 144),
                          ("video", 8192, 410), ("long video", 32768, 1639)):
        g = torch.Generator().manual_seed(0)
        uniform = torch.randn(n, 256, generator=g)
        centres = torch.randn(24, 256, generator=g)
        clustered = (centres[torch.randint(0, 24, (n,), generator=g)]
                     + 0.3 * torch.randn(n, 256, generator=g))
        for kind, tokens in (("random", uniform), ("clustered", clustered)):
            rates = ", ".join(f"m={m}: {r:.1f}" for m, r in picks_per_pass(tokens, keep).items())
            print(f"{name} N={n} fill of {keep} ({kind}): picks per pass {rates}", flush=True)


if __name__ == "__main__":
    main()
