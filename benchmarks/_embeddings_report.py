"""benchmarks/embeddings.py's numbers: one summary per run, the ratios to the torch run of the same
table size, the targets, the tables (rich and Markdown) and the plot."""

from __future__ import annotations

import statistics
from typing import Optional

SYNC_AUC_TOLERANCE = 0.005


def best_auc(fixed_rows: int, batch_size: int, final_eval_samples: int) -> float:
    """The planted model's own AUC on the large held-out set (the best any model can expect)."""
    import torch

    from benchmarks._embeddings_worker import ctr

    stream = ctr.ClickStream(ctr.features(fixed_rows), batch_size)
    batches = [stream.batch(i, "test") for i in range(max(1, final_eval_samples // batch_size))]
    return ctr.auc(torch.cat([b.truth for b in batches]), torch.cat([b.labels for b in batches]))


def summarize(cfg, outcome) -> dict:
    """One run's numbers from its processes' records and the memory watch."""
    row = {"label": cfg.label, "variant": cfg.variant, "servers": cfg.servers, "workers": cfg.workers,
           "mode": cfg.mode, "fixed_rows": cfg.fixed_rows, "status": outcome.status, "reason": outcome.reason,
           "wall_s": outcome.wall_s, "memory_proc_mib": outcome.memory, "left_running": outcome.left}
    if outcome.status != "ok":
        return row
    finals = sorted((r for r in outcome.records if r["kind"] == "final"), key=lambda r: r["rank"])
    evals = sorted((r for r in outcome.records if r["kind"] == "eval" and r["rank"] == 0),
                   key=lambda r: (r["samples"], r["final"]))
    curve = [r for r in evals if not r["final"]]
    train_s = max(f["train_s"] for f in finals)
    samples = sum(f["samples"] for f in finals)
    moved = [sum(col) for col in zip(*(f["rows_moved"] for f in finals))]
    row.update(
        samples=samples, train_s=train_s, samples_per_s=samples / train_s,
        # the rate after the first evaluation: without start-up (first touches, optimizer state)
        steady_samples_per_s=((curve[-1]["samples"] - curve[0]["samples"]) / (curve[-1]["train_s"] - curve[0]["train_s"])
                              if len(curve) > 1 and curve[-1]["train_s"] > curve[0]["train_s"] else None),
        auc=next(r["auc"] for r in evals if r["final"]), eval_n=next(r["n"] for r in evals if r["final"]),
        curve=[{"samples": r["samples"], "train_s": r["train_s"], "auc": r["auc"], "loss": r["loss"]} for r in curve],
        rows_moved_per_server=moved, rows_per_s_per_server=[m / train_s for m in moved],
        worker_peak_mib=[f["peak_rss_mib"] for f in finals],
        worker_setup_mib=[f["setup_rss_mib"] for f in finals],
        cuda_peak_mib=[f["cuda_peak_mib"] for f in finals if f.get("cuda_peak_mib") is not None],
        server_peak_mib=[v for k, v in sorted(outcome.memory.items()) if k.startswith("server ")],
        scheduler_peak_mib=outcome.memory.get("scheduler"), launcher_peak_mib=outcome.memory.get("ps-launch"),
        finals=finals,
    )
    stats = next((f["server_stats"] for f in finals if f.get("server_stats")), None)
    if stats is not None:
        row["table_rows"] = sum(t["rows"] for s in stats for t in s["tables"].values())
    elif finals[0].get("table_rows"):
        row["table_rows"] = sum(finals[0]["table_rows"].values())
    return row


def _f(value: Optional[float], fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


class Report:
    def __init__(self, command: str, settings: dict, best: dict[int, float]):
        self.command, self.settings, self.best = command, settings, best
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def baseline(self, fixed_rows: int) -> Optional[dict]:
        return next((r for r in self.rows if r["variant"] == "torch" and r["fixed_rows"] == fixed_rows
                     and r["status"] == "ok"), None)

    def with_ratios(self, row: dict) -> dict:
        base = self.baseline(row["fixed_rows"])
        out = dict(row)
        if base is None or row["status"] != "ok":
            return out
        out["speed_ratio"] = row["samples_per_s"] / base["samples_per_s"]
        if row.get("steady_samples_per_s") and base.get("steady_samples_per_s"):
            out["steady_ratio"] = row["steady_samples_per_s"] / base["steady_samples_per_s"]
        out["auc_delta"] = row["auc"] - base["auc"]
        out["rows_ratio"] = statistics.mean(row["rows_per_s_per_server"]) / base["rows_per_s_per_server"][0]
        return out

    # -- what the targets say ---------------------------------------------------------------

    def targets(self) -> list[str]:
        lines = []
        sync = [self.with_ratios(r) for r in self.rows if r["status"] == "ok" and r["variant"] == "ps"
                and r["mode"] == "sync" and self.baseline(r["fixed_rows"])]
        if sync:
            worst = max(sync, key=lambda r: abs(r["auc_delta"]))
            met = all(abs(r["auc_delta"]) <= SYNC_AUC_TOLERANCE for r in sync)
            lines.append(f"sync AUC within {SYNC_AUC_TOLERANCE} of torch at equal samples: "
                         f"{'met' if met else 'MISSED'} ({len(sync)} sync runs; largest |delta| "
                         f"{abs(worst['auc_delta']):.6f}, {worst['label']} at {worst['fixed_rows']:,} rows)")
        sizes = sorted({r["fixed_rows"] for r in self.rows if r["variant"] == "ps" and r["status"] == "ok"
                        and r["servers"] == 1 and r["workers"] == 1 and r["mode"] == "sync"})
        if len(sizes) > 1:
            ps_mem = {n: self._one(n, "ps")["worker_peak_mib"][0] for n in sizes}
            small, large = sizes[0], sizes[-1]
            growth = ps_mem[large] / ps_mem[small]
            torch_mem = {n: self._one(n, "torch")["worker_peak_mib"][0] for n in sizes if self._one(n, "torch")}
            torch_note = ", ".join(f"{n:,} rows {m:,.0f} MiB" for n, m in torch_mem.items())
            lines.append(f"a worker's memory does not grow with the table size: "
                         f"{'met' if growth < 1.15 else 'MISSED'} (ps worker peak RSS {ps_mem[small]:,.0f} MiB at "
                         f"{small:,} rows per fixed table, {ps_mem[large]:,.0f} MiB at {large:,}: x{growth:.2f}; "
                         f"torch: {torch_note or 'not run'})")
        return lines

    def _one(self, fixed_rows: int, variant: str) -> Optional[dict]:
        return next((r for r in self.rows if r["fixed_rows"] == fixed_rows and r["variant"] == variant
                     and r["status"] == "ok" and (variant != "ps" or (r["servers"], r["workers"], r["mode"]) == (1, 1, "sync"))),
                    None)

    # -- tables -----------------------------------------------------------------------------

    MAIN_COLUMNS = ("run", "samples/s", "x torch", "steady samples/s", "x torch (steady)", "held-out AUC",
                    "AUC - torch", "rows/s per server", "x torch", "worker peak RSS MiB", "server peak RSS MiB",
                    "rows held")

    def main_rows(self) -> list[list[str]]:
        main = self.settings["fixed_rows"]
        out = []
        for r in (self.with_ratios(r) for r in self.rows if r["fixed_rows"] == main):
            if r["status"] != "ok":
                out.append([r["label"], r["status"] + ": " + r["reason"].splitlines()[0]] + [""] * 10)
                continue
            out.append([
                r["label"], f"{r['samples_per_s']:,.0f}", _f(r.get("speed_ratio"), ".2f"),
                _f(r.get("steady_samples_per_s"), ",.0f"), _f(r.get("steady_ratio"), ".2f"), f"{r['auc']:.4f}",
                _f(r.get("auc_delta"), "+.5f"), f"{statistics.mean(r['rows_per_s_per_server']):,.0f}",
                _f(r.get("rows_ratio"), ".2f"), " / ".join(f"{m:,.0f}" for m in r["worker_peak_mib"]),
                " / ".join(f"{m:,.0f}" for m in r["server_peak_mib"]) or "—", f"{r.get('table_rows', 0):,}"])
        return out

    SIZE_COLUMNS = ("rows per fixed table", "torch peak RSS MiB", "ps worker peak RSS MiB", "ps server peak RSS MiB",
                    "rows held by torch", "rows held by the ps server", "AUC torch", "AUC ps", "best possible AUC")

    def size_rows(self) -> list[list[str]]:
        out = []
        for n in sorted({r["fixed_rows"] for r in self.rows}):
            t, p = self._one(n, "torch"), self._one(n, "ps")
            skipped = next((r for r in self.rows if r["fixed_rows"] == n and r["variant"] == "torch"
                            and r["status"] != "ok"), None)
            out.append([f"{n:,}",
                        f"{t['worker_peak_mib'][0]:,.0f}" if t else (f"{skipped['status']}: {skipped['reason']}"
                                                                     if skipped else "—"),
                        f"{p['worker_peak_mib'][0]:,.0f}" if p else "—",
                        " / ".join(f"{m:,.0f}" for m in p["server_peak_mib"]) if p else "—",
                        f"{t.get('table_rows', 0):,}" if t else "—", f"{p.get('table_rows', 0):,}" if p else "—",
                        f"{t['auc']:.4f}" if t else "—", f"{p['auc']:.4f}" if p else "—", f"{self.best[n]:.4f}"])
        return out

    def print(self, console) -> None:
        from rich.table import Table

        for title, columns, rows in (
                (f"{self.settings['samples']:,} samples, fixed tables of {self.settings['fixed_rows']:,} rows "
                 f"(best possible AUC {self.best[self.settings['fixed_rows']]:.4f})", self.MAIN_COLUMNS,
                 self.main_rows()),
                ("memory against table size (torch, ps sync 1 server / 1 worker)", self.SIZE_COLUMNS,
                 self.size_rows())):
            table = Table(title=title)
            for c in columns:
                table.add_column(c, justify="left" if c.startswith("run") else "right")
            for r in rows:
                table.add_row(*r)
            console.print(table)
        for line in self.targets():
            console.print(line)

    def markdown(self) -> str:
        def md(columns, rows) -> str:
            lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                                     for i in range(len(columns))) + "|"]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

        s = self.settings
        dirty = s["uncommitted_framework_files"]
        code = f"commit {s['commit']}" + (f" with uncommitted changes ({'; '.join(dirty)})" if dirty else "")
        return "\n\n".join([
            f"```\n{self.command}\n```",
            f"{s['samples']:,} samples per run, batch {s['batch_size']}, device {s['device']}, {s['cores']} cores, "
            f"{code}; best possible held-out AUC {self.best[s['fixed_rows']]:.4f} "
            f"({s['final_eval_samples']:,} held-out samples)",
            md(self.MAIN_COLUMNS, self.main_rows()), md(self.SIZE_COLUMNS, self.size_rows()),
            "\n".join(f"* {line}" for line in self.targets())]) + "\n"

    def to_json(self) -> dict:
        return {"command": self.command, "settings": self.settings,
                "best_auc": {str(k): v for k, v in self.best.items()},
                "runs": [self.with_ratios(r) for r in self.rows], "targets": self.targets()}

    # -- the plot ---------------------------------------------------------------------------

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        main = self.settings["fixed_rows"]
        runs = [r for r in self.rows if r["fixed_rows"] == main and r["status"] == "ok"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
        for r in runs:
            style = {"torch": dict(color="black", linewidth=2.5), "ddp": dict(color="grey", linewidth=2)}.get(
                r["variant"], dict(linestyle="-" if r["mode"] == "sync" else "--",
                                   marker="o" if r["workers"] == 1 else "s", markersize=3))
            xs = [c["samples"] for c in r["curve"]]
            ts = [c["train_s"] for c in r["curve"]]
            ys = [c["auc"] for c in r["curve"]]
            line, = axes[0].plot(xs, ys, label=r["label"], **style)
            axes[1].plot(ts, ys, color=line.get_color(), **{k: v for k, v in style.items() if k != "color"})
        for ax, xlabel in zip(axes, ("training samples", "training seconds (slowest worker)")):
            ax.axhline(self.best[main], color="green", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"held-out AUC ({self.settings['eval_samples']:,} samples)")
        axes[0].text(0.02, self.best[main], "planted model (best possible)", color="green", va="bottom",
                     transform=axes[0].get_yaxis_transform())
        axes[0].legend(fontsize=7, ncol=2, loc="lower right")
        fig.suptitle(f"DLRM-style click model, fixed tables of {main:,} rows, batch {self.settings['batch_size']}, "
                     f"device {self.settings['device']}")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
