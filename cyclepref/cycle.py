"""The cycle (PAPER.md §1-2): candidate generation, reconstruction and scoring, in both directions.

I2T: generate_i2t (each captioner captions each image) -> reconstruct_i2t (the text-to-image model renders each
distinct cleaned caption of an input once) -> score_i2t (image similarity of the input and each reconstruction).
T2I: generate_t2i (each text-to-image model renders each prompt once per seed) -> reconstruct_t2i (the captioner
describes each image) -> score_t2i (text similarity of the prompt and each back-caption).

Every item has a key (hash of input id, model identity, prompt template, seed and generation params); per-item
generator seeds derive from it. Finished items live in a work store (cyclepref.workstore) so that a stage resumes
item by item and an added model computes only its own items. Every model is loaded once per stage, only when it
has work, and every model call is batched. What a stage publishes from its work store is checked against the table
contract first (cyclepref.tables.conform_to_contract).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cyclepref import store, tables
from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.inputs import INPUTS_SCHEMA, decode_image
from cyclepref.models import fingerprint, local_spec
from cyclepref.engine import map_batches
from cyclepref.workstore import WorkStore, each, key_of, publish, run_batches, seed_of

log = logging.getLogger("cyclepref.cycle")

WORK = Path("data/work")
IMAGE_ROWS_PER_SHARD = 500
TEXT_ROWS = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("raw_text", pa.string(), nullable=False)])
IMAGE_ROWS = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False)])
SCORE_ROWS = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("score", pa.float64(), nullable=False)])
I2T_QUARANTINE = pa.schema(
    [pa.field(n, pa.string(), nullable=False) for n in ("candidate_id", "input_id", "model", "reason")]
)


@dataclass(frozen=True)
class Context:
    """Where a stage reads and writes, and the runtime device."""

    root: Path
    device: str = "cpu"

    def path(self, name: str) -> Path:
        return self.root / tables.PATHS[name]

    def work(self, stage: str, schema: pa.Schema) -> WorkStore:
        return WorkStore(self.root / WORK / stage, schema, "key")

    def fingerprint(self, path: str, revision: str | None) -> str:
        local = self.root / path
        return fingerprint(str(local) if local.exists() else path, revision, self.root / WORK / "fingerprints.json")


def captioner_hash(ctx: Context, spec: CaptionerSpec, prompt: str) -> str:
    return key_of(
        "captioner", ctx.fingerprint(spec.path, spec.revision), spec.family, prompt, spec.max_new_tokens, spec.dtype
    )


def t2i_hash(ctx: Context, spec: T2ISpec) -> str:
    return key_of(
        "t2i", ctx.fingerprint(spec.path, spec.revision), spec.family, spec.steps, spec.guidance, spec.height,
        spec.width, spec.dtype, *([spec.max_sequence_length] if spec.max_sequence_length is not None else []),
    )


def text_key(input_id: str, text: str) -> str:
    """Identity of a caption within its input: equal ignoring case and surrounding white space."""
    return key_of(input_id, text.strip().lower())


def _texts(keys: list[str], texts: list[str]) -> pa.Table:
    return pa.table({"key": keys, "raw_text": texts}, schema=TEXT_ROWS)


def _image_rows(keys: list[str], pngs: list[bytes]) -> pa.Table:
    return pa.table({"key": keys, "image": pngs}, schema=IMAGE_ROWS)


def _digests(keys: list[str], images: pa.ChunkedArray) -> dict[str, str]:
    """key -> sha256 of its image bytes: what a stored result computed from the image is bound to."""
    return {k: hashlib.sha256(img.as_py() or b"").hexdigest() for k, img in zip(keys, images, strict=True)}


def _lookup(table: pa.Table, key: str) -> dict[str, int]:
    return {k: i for i, k in enumerate(table.column(key).to_pylist())}


def read_inputs(ctx: Context, need: str) -> pa.Table:
    """Prepared inputs that have `need` ("image" or "prompt")."""
    t = store.read_table(ctx.path("inputs"), INPUTS_SCHEMA)
    return t.filter(pc.is_valid(t.column(need)))


def iter_shards(path: Path) -> Iterator[pa.Table]:
    """The shards of a sharded image table, one at a time (bounded memory)."""
    import pyarrow.parquet as pq

    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{path}: no shards (has the stage that writes it run? try `dvc repro`)")
    for p in parts:
        yield pq.read_table(p)


def write_sharded(ctx: Context, name: str, keys: list[str], schema: pa.Schema, make: Callable) -> list[Path]:
    """Publish table `name` shard by shard, each shard checked against its contract (keys unique across shards)."""
    out = ctx.path(name)
    tables.require_unique(name, keys)
    paths = publish(keys, out, schema, IMAGE_ROWS_PER_SHARD, lambda ks: tables.conform_to_contract(name, make(ks)))
    store.write_manifest(out, paths, rows=len(keys))
    return paths


def publish_table(ctx: Context, name: str, table: pa.Table) -> Path:
    """Write table `name` once it conforms to its contract (tables.conform_to_contract)."""
    return store.write_table(tables.conform_to_contract(name, table), ctx.path(name))


# ---------------------------------------------------------------- I2T


def generate_i2t(ctx: Context, captioners: list[CaptionerSpec], batch_size: int) -> dict:
    """Every captioner captions every input image (greedy). Captions empty after cleaning are quarantined."""
    from cyclepref.models.captioner import clean_caption, prompt_for

    inputs = read_inputs(ctx, "image")
    ids = inputs.column("input_id").to_pylist()
    row_of = {k: i for i, k in enumerate(ids)}
    work = ctx.work("generate_i2t", TEXT_ROWS)
    plan: list[dict] = []
    computed = 0
    for spec in captioners:
        prompt = prompt_for(spec)
        gen_hash = captioner_hash(ctx, spec, prompt)
        items = [
            dict(candidate_id=key_of(i, spec.name, prompt, 0, gen_hash), input_id=i, model=spec.name, prompt=prompt,
                 seed=0, gen_hash=gen_hash)
            for i in ids
        ]
        plan += items
        input_of = {it["candidate_id"]: it["input_id"] for it in items}

        def compute(batches: list[list[str]], spec=spec, input_of=input_of) -> Iterator[pa.Table]:
            payloads = ({"images": [inputs.column("image")[row_of[input_of[k]]].as_py() for k in b]} for b in batches)
            results = map_batches("caption", local_spec(ctx.root, spec), ctx.device, payloads)
            return (_texts(b, texts) for b, texts in zip(batches, results))

        computed += run_batches([it["candidate_id"] for it in items], work, batch_size, compute,
                                f"generate_i2t[{spec.name}]")

    plan.sort(key=lambda r: (r["input_id"], r["model"]))
    raw = work.rows([r["candidate_id"] for r in plan]).column("raw_text").to_pylist()
    rows, quarantined = [], []
    for r, raw_text in zip(plan, raw, strict=True):
        text = clean_caption(raw_text)
        if not text:
            quarantined.append(dict(candidate_id=r["candidate_id"], input_id=r["input_id"], model=r["model"],
                                    reason="caption empty after cleaning"))
            continue
        rows.append({**r, "raw_text": raw_text, "text": text, "text_key": text_key(r["input_id"], text)})
    cand = publish_table(ctx, "i2t_candidates", pa.Table.from_pylist(rows, schema=tables.I2T_CANDIDATES))
    q = store.write_table(pa.Table.from_pylist(quarantined, schema=I2T_QUARANTINE), ctx.path("i2t_quarantine"),
                          I2T_QUARANTINE)
    store.write_manifest(cand.parent, [cand, q])
    return {"candidates": len(rows), "computed": computed, "reused": len(plan) - computed,
            "quarantined": len(quarantined)}


def reconstruct_i2t(ctx: Context, spec: T2ISpec, batch_size: int) -> dict:
    """The text-to-image model renders each distinct cleaned caption of each input once (per-item seed)."""
    cands = store.read_table(ctx.path("i2t_candidates"), tables.I2T_CANDIDATES)
    gen_hash = t2i_hash(ctx, spec)
    first: dict[str, dict] = {}
    for r in cands.select(["text_key", "input_id", "text"]).to_pylist():
        first.setdefault(r["text_key"], r)
    unique = sorted(first.values(), key=lambda r: (r["input_id"], r["text_key"]))
    item_of_text = {r["text_key"]: key_of(r["text_key"], gen_hash) for r in unique}
    key_of_text = {r["text_key"]: key_of(item_of_text[r["text_key"]], r["text"]) for r in unique}
    text_of = {key_of_text[r["text_key"]]: r["text"] for r in unique}
    seed_of_key = {key_of_text[t]: seed_of(item) for t, item in item_of_text.items()}
    work = ctx.work("reconstruct_i2t", IMAGE_ROWS)

    def compute(batches: list[list[str]]) -> Iterator[pa.Table]:
        payloads = ({"prompts": [text_of[k] for k in b], "seeds": [seed_of_key[k] for k in b]} for b in batches)
        results = map_batches("render", local_spec(ctx.root, spec), ctx.device, payloads)
        return (_image_rows(b, images) for b, images in zip(batches, results))

    computed = run_batches([key_of_text[r["text_key"]] for r in unique], work, batch_size, compute,
                           f"reconstruct_i2t[{spec.name}]")

    def make(text_keys: list[str]) -> pa.Table:
        keys = [key_of_text[t] for t in text_keys]
        images = work.rows(keys).column("image")
        return pa.table(
            {
                "text_key": text_keys,
                "input_id": [first[t]["input_id"] for t in text_keys],
                "text": [first[t]["text"] for t in text_keys],
                "model": [spec.name] * len(keys),
                "seed": [seed_of_key[k] for k in keys],
                "gen_hash": [gen_hash] * len(keys),
                "image": images,
            },
            schema=tables.I2T_RECONSTRUCTIONS,
        )

    write_sharded(ctx, "i2t_reconstructions", [r["text_key"] for r in unique], tables.I2T_RECONSTRUCTIONS, make)
    return {"captions": cands.num_rows, "distinct": len(unique), "computed": computed,
            "reused": len(unique) - computed}


def score_i2t(ctx: Context, metric, batch_size: int) -> dict:
    """similarity(input image, reconstruction) per distinct caption, joined back to every candidate. A stored score
    is reused only when the caption, its reconstruction, the input image and the metric are all unchanged."""
    from cyclepref.models.similarity import ImageSimilarity
    from cyclepref.scoring import DIRECTIONS

    cands = store.read_table(ctx.path("i2t_candidates"), tables.I2T_CANDIDATES)
    metric_hash = key_of("metric", metric.kind, ctx.fingerprint(metric.path, metric.revision))
    work = ctx.work("score_i2t", SCORE_ROWS)
    sim = None
    originals: dict = {}
    score_key: dict[str, str] = {}
    rec_text: dict[str, str] = {}
    computed = 0
    inputs = read_inputs(ctx, "image")
    input_row = _lookup(inputs, "input_id")
    input_digest = _digests(inputs.column("input_id").to_pylist(), inputs.column("image"))
    for shard in iter_shards(ctx.path("i2t_reconstructions")):
        text_keys, texts = shard.column("text_key").to_pylist(), shard.column("text").to_pylist()
        digests = _digests(text_keys, shard.column("image"))
        gens, ids = shard.column("gen_hash").to_pylist(), shard.column("input_id").to_pylist()
        rec_keys = [key_of(t, text, g, digests[t], input_digest.get(i, "missing"), metric_hash)
                    for t, text, g, i in zip(text_keys, texts, gens, ids, strict=True)]
        score_key.update(zip(text_keys, rec_keys, strict=True))
        rec_text.update(zip(text_keys, texts, strict=True))
        todo = work.todo(rec_keys)
        if not todo:
            continue
        if sim is None:
            sim = ImageSimilarity(local_spec(ctx.root, metric), ctx.device)
        row = {k: i for i, k in enumerate(rec_keys)}
        shard_inputs = shard.column("input_id").to_pylist()
        need = sorted({shard_inputs[row[k]] for k in todo} - set(originals))
        for start in range(0, len(need), batch_size):
            ids = need[start : start + batch_size]
            embs = sim.embed([decode_image(inputs.column("image")[input_row[i]].as_py()) for i in ids], batch_size)
            originals.update(zip(ids, embs, strict=True))

        def compute(keys: list[str], shard=shard, row=row, shard_inputs=shard_inputs) -> pa.Table:
            import torch

            recs = sim.embed([decode_image(shard.column("image")[row[k]].as_py()) for k in keys], batch_size)
            orig = torch.stack([originals[shard_inputs[row[k]]] for k in keys])
            return pa.table({"key": keys, "score": sim.compare(orig, recs).double().tolist()}, schema=SCORE_ROWS)

        computed += run_batches(todo, work, batch_size, each(compute), "score_i2t")

    text_keys = cands.column("text_key").to_pylist()
    missing = sorted(set(text_keys) - set(score_key))
    if missing:
        raise RuntimeError(f"score_i2t: {len(missing)} caption(s) have no reconstruction; rerun reconstruct_i2t")
    changed = [c for c, t, text in zip(cands.column("candidate_id").to_pylist(), text_keys,
                                       cands.column("text").to_pylist(), strict=True)
               if rec_text[t].strip().lower() != text.strip().lower()]
    if changed:
        raise RuntimeError(f"score_i2t: {len(changed)} caption(s) differ from the text their reconstruction was made "
                           f"from (e.g. candidate {changed[0]}); rerun reconstruct_i2t")
    scores = work.rows([score_key[t] for t in text_keys]).column("score")
    n = cands.num_rows
    out = pa.table(
        {
            "task": ["i2t"] * n,
            "input_id": cands.column("input_id"),
            "candidate_id": cands.column("candidate_id"),
            "model": cands.column("model"),
            "text": cands.column("text"),
            "score": scores,
            "metric": [metric.kind] * n,
            "direction": [DIRECTIONS[metric.kind]] * n,
        },
        schema=tables.SCORES,
    )
    path = publish_table(ctx, "i2t_scores", out)
    store.write_manifest(path.parent, [path], rows=n)
    return {"scores": n, "distinct": len(score_key), "computed": computed, "reused": len(score_key) - computed}


# ---------------------------------------------------------------- T2I


def generate_t2i(ctx: Context, models: list[T2ISpec], seeds: list[int], batch_size: int) -> dict:
    """Every text-to-image model renders every prompt once per seed; the generator seed derives from the key."""
    inputs = read_inputs(ctx, "prompt").select(["input_id", "prompt"]).to_pylist()
    work = ctx.work("generate_t2i", IMAGE_ROWS)
    plan: list[dict] = []
    computed = 0
    for spec in models:
        gen_hash = t2i_hash(ctx, spec)
        items = [
            dict(candidate_id=key_of(r["input_id"], spec.name, r["prompt"], s, gen_hash), input_id=r["input_id"],
                 model=spec.name, prompt=r["prompt"], seed=s, gen_hash=gen_hash)
            for r in inputs
            for s in seeds
        ]
        plan += items
        prompt_of = {it["candidate_id"]: it["prompt"] for it in items}

        def compute(batches: list[list[str]], spec=spec, prompt_of=prompt_of) -> Iterator[pa.Table]:
            payloads = ({"prompts": [prompt_of[k] for k in b], "seeds": [seed_of(k) for k in b]} for b in batches)
            results = map_batches("render", local_spec(ctx.root, spec), ctx.device, payloads)
            return (_image_rows(b, images) for b, images in zip(batches, results))

        computed += run_batches([it["candidate_id"] for it in items], work, batch_size, compute,
                                f"generate_t2i[{spec.name}]")

    plan.sort(key=lambda r: (r["input_id"], r["model"], r["seed"]))
    by_id = {r["candidate_id"]: r for r in plan}

    def make(keys: list[str]) -> pa.Table:
        meta = pa.Table.from_pylist([by_id[k] for k in keys])
        return meta.append_column("image", work.rows(keys).column("image"))

    write_sharded(ctx, "t2i_candidates", [r["candidate_id"] for r in plan], tables.T2I_CANDIDATES, make)
    return {"candidates": len(plan), "computed": computed, "reused": len(plan) - computed}


def reconstruct_t2i(ctx: Context, spec: CaptionerSpec, batch_size: int) -> dict:
    """The backward captioner describes every candidate image (greedy)."""
    from cyclepref.models.captioner import clean_caption, prompt_for

    gen_hash = captioner_hash(ctx, spec, prompt_for(spec))
    work = ctx.work("reconstruct_t2i", TEXT_ROWS)
    meta: list[dict] = []
    computed = 0
    for shard in iter_shards(ctx.path("t2i_candidates")):
        rows = shard.select(["candidate_id", "input_id", "model"]).to_pylist()
        digests = _digests([r["candidate_id"] for r in rows], shard.column("image"))
        keys = [key_of(r["candidate_id"], gen_hash, digests[r["candidate_id"]]) for r in rows]
        meta += [{**r, "key": k} for r, k in zip(rows, keys, strict=True)]
        row = {k: i for i, k in enumerate(keys)}

        def compute(batches: list[list[str]], shard=shard, row=row) -> Iterator[pa.Table]:
            payloads = ({"images": [shard.column("image")[row[k]].as_py() for k in b]} for b in batches)
            results = map_batches("caption", local_spec(ctx.root, spec), ctx.device, payloads)
            return (_texts(b, texts) for b, texts in zip(batches, results))

        computed += run_batches(keys, work, batch_size, compute, f"reconstruct_t2i[{spec.name}]")

    raw = work.rows([m["key"] for m in meta]).column("raw_text").to_pylist()
    out = pa.Table.from_pylist(
        [
            dict(candidate_id=m["candidate_id"], input_id=m["input_id"], model=m["model"], gen_hash=gen_hash,
                 raw_text=t, text=clean_caption(t))
            for m, t in zip(meta, raw, strict=True)
        ],
        schema=tables.T2I_RECONSTRUCTIONS,
    )
    path = publish_table(ctx, "t2i_reconstructions", out)
    store.write_manifest(path.parent, [path], rows=out.num_rows)
    empty = sum(1 for t in out.column("text").to_pylist() if not t)
    return {"back_captions": out.num_rows, "computed": computed, "reused": out.num_rows - computed,
            "empty_back_captions": empty}


def score_t2i(ctx: Context, metric, batch_size: int) -> dict:
    """similarity(prompt, back-caption) per candidate; each prompt is embedded once."""
    from cyclepref.models.similarity import TextSimilarity
    from cyclepref.scoring import DIRECTIONS

    recs = store.read_table(ctx.path("t2i_reconstructions"), tables.T2I_RECONSTRUCTIONS)
    rows = read_inputs(ctx, "prompt").select(["input_id", "prompt"]).to_pylist()
    prompts = {r["input_id"]: r["prompt"] for r in rows}
    metric_hash = key_of("metric", metric.kind, ctx.fingerprint(metric.path, metric.revision))
    rows = recs.select(["candidate_id", "input_id", "model", "text"]).to_pylist()
    keys = [key_of(r["candidate_id"], r["text"], prompts.get(r["input_id"], ""), metric_hash) for r in rows]
    work = ctx.work("score_t2i", SCORE_ROWS)
    todo = work.todo(keys)
    if todo:
        sim = TextSimilarity(local_spec(ctx.root, metric), ctx.device)
        row = {k: i for i, k in enumerate(keys)}
        need = sorted({rows[row[k]]["input_id"] for k in todo})
        prompt_emb = dict(zip(need, sim.embed([prompts[i] for i in need], batch_size), strict=True))

        def compute(ks: list[str]) -> pa.Table:
            import torch

            back = sim.embed([rows[row[k]]["text"] for k in ks], batch_size)
            ref = torch.stack([prompt_emb[rows[row[k]]["input_id"]] for k in ks])
            return pa.table({"key": ks, "score": sim.compare(ref, back).double().tolist()}, schema=SCORE_ROWS)

        run_batches(todo, work, batch_size, each(compute), "score_t2i")
    n = len(rows)
    out = pa.table(
        {
            "task": ["t2i"] * n,
            "input_id": [r["input_id"] for r in rows],
            "candidate_id": [r["candidate_id"] for r in rows],
            "model": [r["model"] for r in rows],
            "text": pa.nulls(n, pa.string()),
            "score": work.rows(keys).column("score"),
            "metric": [metric.kind] * n,
            "direction": [DIRECTIONS[metric.kind]] * n,
        },
        schema=tables.SCORES,
    )
    path = publish_table(ctx, "t2i_scores", out)
    store.write_manifest(path.parent, [path], rows=n)
    return {"scores": n, "computed": len(todo), "reused": n - len(todo)}


# ---------------------------------------------------------------- examples for MLflow


def examples(ctx: Context, stage: str, n: int = 8) -> list[tuple[object | None, str]]:
    """A few (image, caption) examples of a stage's output, for the MLflow run's artifact grid."""
    import pyarrow.parquet as pq

    if stage == "generate_i2t":
        inputs = read_inputs(ctx, "image")
        row = _lookup(inputs, "input_id")
        cands = store.read_table(ctx.path("i2t_candidates")).slice(0, n).to_pylist()
        return [(decode_image(inputs.column("image")[row[c["input_id"]]].as_py()), f"{c['model']}: {c['text']}")
                for c in cands]
    if stage == "reconstruct_i2t":
        recs = pq.read_table(ctx.path("i2t_reconstructions")).slice(0, n).to_pylist()
        return [(decode_image(r["image"]), r["text"]) for r in recs]
    if stage == "generate_t2i":
        cands = pq.read_table(ctx.path("t2i_candidates")).slice(0, n).to_pylist()
        return [(decode_image(c["image"]), f"{c['model']} seed {c['seed']}: {c['prompt']}") for c in cands]
    if stage == "reconstruct_t2i":
        recs = store.read_table(ctx.path("t2i_reconstructions")).slice(0, n).to_pylist()
        cands = pq.read_table(ctx.path("t2i_candidates"), columns=["candidate_id", "image"])
        row = _lookup(cands, "candidate_id")
        return [(decode_image(cands.column("image")[row[r["candidate_id"]]].as_py()), r["text"]) for r in recs]
    if stage in ("score_i2t", "score_t2i"):
        scores = store.read_table(ctx.path(f"{stage[-3:]}_scores")).sort_by([("score", "descending")]).to_pylist()
        picked = scores[: n // 2] + scores[-(n // 2) :] if len(scores) > n else scores
        return [(None, f"{s['model']} {s['metric']}={s['score']:.3f} ({s['direction']} is better): "
                       f"{s['text'] or s['candidate_id']}") for s in picked]
    raise ValueError(f"no examples for stage {stage!r}")
