"""Stage-0 learning curves of the demo task for many configs at once (how `configs/demo_stage0.yaml` was chosen).

Question-aware matching learns in jumps whose timing depends on batch size, Q-Former size, positions and lr;
a GPU runs each config's curve (held-out accuracy per category every `every` steps) in about a minute,
many configs side by side. The per-step dynamics carry over to the CPU demo; time per step does not.

    python benchmarks/stage0_sweep.py bundle bundle.pt          # here, after `make demo` (needs its cache)
    WORKERS=14 python benchmarks/stage0_sweep.py run bundle.pt  # on the GPU machine; prints one JSON per config

The bundle (~45 MB) holds the cached MobileNetV2 features, the tokenised questions (vocabulary cut to the
words used) and the MiniLM-initialised Q-Former weights, so the GPU machine needs no model files.
"""
import json, os, sys, time, torch, torch.nn as nn, torch.nn.functional as F
import torch.multiprocessing as mp
sys.path.insert(0, ".")

CATS = ("existence", "count", "colour", "position")

def make_bundle(path: str) -> None:
    """Run in the repo root after `make demo`: cached features + tokenised questions + BERT-initialised Q-Former."""
    from xllm.interfaces import ImageInterface
    iface = ImageInterface(".cache/models/mobilenet-v2", feature_cache=".cache/features/mobilenet-v2", feature_layer=17,
        feature_positions=49, num_query_tokens=8, qformer_hidden_size=384, qformer_layers=2, qformer_heads=12,
        qformer_intermediate_size=1536, cross_attention_frequency=1, bert_init=".cache/models/minilm-l6",
        qformer_text=True, instruction_aware=True, max_text_tokens=32, dropout=0.0)
    load = iface.media_loader()
    out = {}
    for name in ("train", "test"):
        rows = [json.loads(l) for l in open(f".cache/demo/data/{name}_yesno.jsonl")]
        paths = sorted({r["image"] for r in rows}); index = {p: i for i, p in enumerate(paths)}
        out[name + "_feats"] = torch.stack([load(".cache/demo/data/" + p) for p in paths]).half()
        ids, mask = iface.tokenize_text([r["conversations"][0]["value"].replace("<image>\n", "") for r in rows])
        out[name + "_ids"], out[name + "_mask"] = ids, mask
        out[name + "_ans"] = torch.tensor([1 if r["conversations"][1]["value"] == "Yes" else 0 for r in rows])
        out[name + "_img"] = torch.tensor([index[r["image"]] for r in rows])
        cats = ("existence", "count", "colour", "position")
        out[name + "_cat"] = torch.tensor([cats.index(r["category"]) for r in rows])
    used = torch.unique(torch.cat([out["train_ids"].flatten(), out["test_ids"].flatten()]))
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long); remap[used] = torch.arange(len(used))
    for name in ("train", "test"):
        out[name + "_ids"] = remap[out[name + "_ids"]]
    state = {k: v for k, v in iface.qformer.state_dict().items() if "crossattention" not in k and k != "query_tokens"}
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][used]
    out["qformer_state"] = state
    out["vocab"] = torch.tensor(len(used))
    torch.save(out, path)
    print({k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)}, len(state), "vocab", len(used))


def run(cfg):
    from xllm.interfaces.image import RowColumnPositions, sincos_2d
    from xllm.interfaces.qformer import QFormer
    dev = cfg.get("device", "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
    b = torch.load(cfg["bundle"], weights_only=True)
    torch.manual_seed(cfg["seed"])
    q = QFormer(160, num_query_tokens=cfg["queries"], hidden_size=384, num_layers=cfg["layers"], num_heads=12,
                intermediate_size=1536, cross_attention_frequency=1, dropout=0.0, text_vocab_size=int(b["vocab"]),
                max_text_positions=32)
    if cfg["bert"]:
        own = q.state_dict()
        q.load_state_dict({k: v for k, v in b["qformer_state"].items() if k in own}, strict=False)
        q.embeddings.requires_grad_(False)
    ln = nn.LayerNorm(160)
    pos_kind = cfg["pos"]
    if pos_kind == "learned":
        pos = nn.Parameter(torch.randn(1, 49, 160) * cfg["posstd"])
    elif pos_kind == "factorised":
        factorised = RowColumnPositions(49, 160, cfg["posstd"])
    head = nn.Linear(384, 2)
    mods = nn.ModuleList([q, ln, head]).to(dev)
    extra = []
    if pos_kind == "learned": pos = nn.Parameter(pos.data.to(dev)); extra = [pos]
    if pos_kind == "factorised": factorised = factorised.to(dev); extra = list(factorised.parameters())
    fixed = sincos_2d(49, 160).to(dev) if pos_kind == "sincos2d" else None
    def features(x):
        x = ln(x.float())
        if pos_kind == "learned": x = x + pos
        elif pos_kind == "factorised": x = x + factorised()
        elif pos_kind == "sincos2d": x = x + fixed
        return x
    def forward(feats, ids, mask):
        f = features(feats)
        if cfg["textxattn"]:
            queries = q.query_tokens.expand(f.shape[0], -1, -1)
            embeds = torch.cat([queries, q._text_embeds(ids)], 1)
            m = torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype, device=dev), mask], 1)
            out = q.model(query_embeds=embeds, query_length=embeds.shape[1], attention_mask=m, encoder_hidden_states=f).last_hidden_state[:, :q.num_query_tokens]
        else:
            out = q(f, instruction_ids=ids, instruction_mask=mask)
        return head(out).mean(1)
    params = [p for p in list(mods.parameters()) + extra if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    tr = {k[6:]: v.to(dev) for k, v in b.items() if k.startswith("train_")}
    te = {k[5:]: v.to(dev) for k, v in b.items() if k.startswith("test_")}
    def evaluate():
        mods.eval(); c = []
        with torch.no_grad():
            for s in range(0, len(te["ans"]), 256):
                sl = slice(s, s + 256)
                c.append(forward(te["feats"][te["img"][sl]], te["ids"][sl], te["mask"][sl]).argmax(1) == te["ans"][sl])
        c = torch.cat(c).float(); mods.train()
        return [round(c[te["cat"] == i].mean().item(), 2) for i in range(4)] + [round(c.mean().item(), 3)]
    g = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    n = len(tr["ans"]); step = 0; curve = []; t0 = time.time()
    while step < cfg["steps"]:
        perm = torch.randperm(n, generator=g).to(dev)
        for s in range(0, n - cfg["batch"] + 1, cfg["batch"]):
            bi = perm[s:s + cfg["batch"]]
            loss = F.cross_entropy(forward(tr["feats"][tr["img"][bi]], tr["ids"][bi], tr["mask"][bi]), tr["ans"][bi])
            opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step(); step += 1
            if step % cfg["every"] == 0:
                curve.append((step, evaluate()))
            if step >= cfg["steps"]: break
    # first step where each category reached >= 0.9
    first = {CATS[i]: next((s for s, e in curve if e[i] >= 0.9), None) for i in range(4)}
    return {"cfg": {k: v for k, v in cfg.items() if k not in ("device", "bundle")}, "first90": first, "final": curve[-1], "secs": round(time.time() - t0),
            "curve": [(s, e[4]) for s, e in curve]}

BASE = dict(seed=0, queries=8, layers=2, bert=True, pos="learned", posstd=0.5, textxattn=False, lr=2e-4, batch=32, steps=4000, every=100)
# The last sweep (the demo's chosen size, batch 128): position encoding x lr x seed. Earlier sweeps varied
# batch (32-256), layers (1-2), queries (4-16), BERT init, position init scale and text cross-attention.
CHOSEN_SIZE = {"layers": 1, "queries": 4, "batch": 128, "steps": 1600}
VARIANTS = [
    {**CHOSEN_SIZE, "pos": pos, "lr": lr, "seed": seed}
    for pos, lr, seeds in (
        ("sincos2d", 2e-4, (2, 3)), ("sincos2d", 3e-4, (0, 1, 2)), ("sincos2d", 4e-4, (0, 1, 2)), ("sincos2d", 6e-4, (0,)),
        ("factorised", 2e-4, (3,)), ("factorised", 3e-4, (0, 1)), ("factorised", 4e-4, (1, 2)),
    )
    for seed in seeds
]

if __name__ == "__main__":
    command, bundle = sys.argv[1], sys.argv[2]
    if command == "bundle":
        make_bundle(bundle)
        sys.exit()
    cfgs = [{**BASE, **v, "bundle": bundle} for v in VARIANTS]
    if command == "smoke":
        cfgs = [{**BASE, "steps": 40, "every": 20, "bundle": bundle, "device": "cuda" if torch.cuda.is_available() else "cpu"}]
    workers = int(os.environ.get("WORKERS", "10"))
    with mp.get_context("spawn").Pool(workers) as pool:
        for result in pool.imap_unordered(run, cfgs):
            print(json.dumps(result), flush=True)
