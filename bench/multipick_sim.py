"""How many farthest-point picks one multi-pick pass would confirm (CPU simulation of the rule).

    python bench/multipick_sim.py

A multi-pick fill (the kernels issue, item 8) fetches the distances of the top-m candidates by
the current fill key in one pass and confirms picks while the next argmax stays among them. This
walks the diversity fill on random and clustered tokens and counts picks per pass for several
m: the speed-up bound of such a pass over one pass per pick (the kernels do not do this yet).
"""
import torch


def picks_per_pass(tokens: torch.Tensor, keep: int, widths=(2, 4, 8, 16)) -> dict:
    """{m: picks / passes} for a fill of ``keep`` picks from token 0 over tokens [N, D]."""
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    fill = torch.full((len(unit),), float("inf"))
    chosen = torch.zeros(len(unit), dtype=torch.bool)
    candidates, passes, pick = {}, dict.fromkeys(widths, 0), 0
    for _ in range(keep):
        chosen[pick] = True
        fill = torch.minimum(fill, 1 - unit @ unit[pick]).masked_fill(chosen, float("-inf"))
        following = int(fill.argmax())
        for m in widths:
            if following not in candidates.get(m, ()):  # a new pass: fetch the top m
                passes[m] += 1
                candidates[m] = set(torch.topk(fill, m).indices.tolist())
        pick = following
    return {m: keep / passes[m] for m in widths}


def main() -> None:
    torch.set_num_threads(1)
    for name, n, keep in (("LLaVA-1.5", 576, 32), ("LLaVA-NeXT", 2880, 144), ("video", 8192, 410)):
        g = torch.Generator().manual_seed(0)
        uniform = torch.randn(n, 256, generator=g)
        centres = torch.randn(24, 256, generator=g)
        clustered = (centres[torch.randint(0, 24, (n,), generator=g)]
                     + 0.3 * torch.randn(n, 256, generator=g))
        for kind, tokens in (("random", uniform), ("clustered", clustered)):
            rates = ", ".join(f"m={m}: {r:.1f}" for m, r in picks_per_pass(tokens, keep).items())
            print(f"{name} N={n} fill of {keep} ({kind}): picks per pass {rates}")


if __name__ == "__main__":
    main()
