"""Fine-tuning methods (`--method`). A method is a frozen config dataclass (its settings), its attach function and
one `register_method` call (README, "Extending"):

    @dataclasses.dataclass(frozen=True)
    class MyConfig(MethodConfig):
        width: int = 4

    register_method("mine", MyConfig, my_attach, trains="...")  # my_attach(lt_model, config) -> the model to train
    register_method("mine", MyConfig, modules=my_modules, ...)  # or: it adds modules, my_modules(lt_model, record, wiring)

The config is what an export records (`config.json`'s `method`: its name and fields) and the only thing that rebuilds
the model's added modules. Declared here without torch, so --help lists the methods at once; the built-in attach
functions live in peft_methods.py and are imported on first use (named "module:attr", as transformers' lazy auto
mappings do).
"""
import dataclasses

from .errors import UserError, require
from .registry import Registry, resolve

METHODS = Registry("method", flag="--method")
LORA_INITS = ("peft", "lift")


_ATTACH = "lt_utils.peft_methods:"
_MODULES = _ATTACH + "attach_modules"  # the attach function of every method that adds modules


def bottleneck_dim(num_classes, num_layers):
    """LIFT's rule 2**max(0, floor(log2(K / (2L)))), in exact integer arithmetic."""
    dim = 1
    while dim * 2 * 2 * num_layers <= num_classes:
        dim *= 2
    return dim


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What a method builds, once its defaults are resolved. Field names are the train_lt.py flags they come from
    (`from_settings`), so the flag table maps into every method's config the same way; `derive` checks the settings
    and fills those LIFT derives from K classes and L blocks (stored as numbers, so a rebuild reads them instead of
    deriving them again)."""

    name: str
    partial_layers: int | None = None  # the last k blocks tuned (None: all)

    @classmethod
    def from_settings(cls, name, num_classes, num_layers, **settings):
        """The config of `settings` (flag name -> value; others are ignored), LIFT's derived defaults resolved."""
        names = {f.name for f in dataclasses.fields(cls)} - {"name"}
        values = {k: _frozen(v) for k, v in settings.items() if k in names}
        config = cls(name=name, **values)
        return config.derive(num_classes, num_layers)

    def derive(self, num_classes, num_layers):
        return self

    def to_record(self):
        """The config as config.json holds it: {"name": ..., field: value, ...} (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class RankConfig(MethodConfig):
    """Bottleneck modules of rank r (default: LIFT's rule from K classes and L blocks)."""

    r: int | None = None

    def derive(self, num_classes, num_layers):
        r = bottleneck_dim(num_classes, num_layers) if self.r is None else int(self.r)
        if r < 1:
            raise UserError(f"adapter/LoRA rank r must be >= 1, got {r}")
        return dataclasses.replace(self, r=r)

    @classmethod
    def from_settings(cls, name, num_classes, num_layers, adapter_dim=None, **settings):
        return super().from_settings(name, num_classes, num_layers, **{"r": adapter_dim, **settings})


@dataclasses.dataclass(frozen=True)
class LoraConfig(RankConfig):
    """peft LoRA; target_modules None: the backbone kind's q and v projections (LIFT)."""

    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple | None = None
    lora_init: str = "peft"

    def derive(self, num_classes, num_layers):
        require(self.lora_init in LORA_INITS, f"--lora_init {self.lora_init}: choose one of {', '.join(LORA_INITS)}")
        targets = self.lora_target_modules
        if isinstance(targets, str):  # "q_proj,v_proj"
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        return dataclasses.replace(super().derive(num_classes, num_layers), lora_target_modules=targets)


@dataclasses.dataclass(frozen=True)
class LoraMlpConfig(LoraConfig):
    """LoRA on the two Linears of each MLP: the targets are set by the method."""

    def derive(self, num_classes, num_layers):
        require(not self.lora_target_modules, "--method lora_mlp sets its targets (the MLP's two Linears); drop "
                                              "--lora_target_modules or use --method lora")
        return super().derive(num_classes, num_layers)


@dataclasses.dataclass(frozen=True)
class PromptConfig(MethodConfig):
    vpt_len: int = 10

    def derive(self, num_classes, num_layers):
        require(self.vpt_len >= 1, f"--vpt_len must be >= 1, got {self.vpt_len}")
        return self


@dataclasses.dataclass(frozen=True)
class MaskConfig(MethodConfig):
    """mask_ratio None: LIFT's K / (12 L D), computed by the attach function from the model's width."""

    mask_ratio: float | None = None
    mask_seed: int = 0

    def derive(self, num_classes, num_layers):
        ratio = self.mask_ratio
        require(ratio is None or 0 < ratio <= 1, f"--mask_ratio must be in (0, 1], got {ratio}")
        return self


@dataclasses.dataclass
class Method:
    """One METHODS entry: the config class, the attach function and what the method is to the rest of the project.

    attach: f(lt_model, config) -> the model to train (all starts frozen but the head), or "module:attr" naming it.
    modules: it adds modules that exports rebuild (peft_modules.MODULES[name], from the recorded config).
    """

    config: type
    attach: object
    trains: str = ""  # what trains, for --help and the README
    # exports can be averaged tensor by tensor: the trained tensors are weights (or re-parameterise them: SSF, masks;
    # LoRA as exact deltas merged into the weights) or adapter weights of one seeded init; not prompts (tokens)
    soupable: bool = True
    init_from: bool = False  # --init_from accepts it: it trains on top of an export's (LoRA-merged) weights
    head_only: bool = False  # nothing before the head trains: train_lt.py trains the head alone on cached features
    peft: bool = False  # trained through peft (LoRA): merged into model.safetensors, its plain adapter in adapter/
    partial: bool = True  # --partial_layers applies (the method tunes blocks)
    modules: bool = False

    def attach_function(self):
        if callable(self.attach):
            return self.attach
        return resolve(self.attach)


def register_method(name, config, attach=None, modules=None, **what):
    """Register a method: `config` its MethodConfig subclass, `attach` f(lt_model, config) or "module:attr", `what`
    the Method fields (trains, soupable, init_from, ...).

    A method that adds modules passes `modules`: f(lt_model, record, wiring) -> the nn.Module holding them, hooked into
    the backbone (`record`: the config as exports record it; `wiring`: where the blocks are, see
    peft_modules.find_blocks). It is registered in peft_modules.MODULES, from which exports rebuild the modules;
    training attaches them the same way and trains them (`True`: the builder is registered there already)."""
    require(issubclass(config, MethodConfig), f"method {name!r}: its config must subclass MethodConfig")
    if callable(modules):
        from .peft_modules import register_modules

        register_modules(name)(modules)
    if modules:
        attach = attach or _MODULES
    return METHODS.register(name, Method(config, attach, modules=bool(modules), **what))


def unregister_method(name):
    """Remove a method (and its module builder); tests that register a throw-away method clean up with this."""
    if METHODS.get(name).modules:
        from .peft_modules import MODULES

        MODULES.pop(name, None)
    METHODS.unregister(name)


def method_config(name, num_classes, num_layers, **settings):
    """The config of --method `name` with `settings` (flag name -> value), LIFT's defaults resolved."""
    return METHODS.get(name).config.from_settings(name, num_classes, num_layers, **settings)


_BLOCKS = {"init_from": True}
register_method("adaptformer", RankConfig, _ATTACH + "attach_adaptformer", modules=True,
                trains="AdaptFormer bottlenecks beside each MLP (r from LIFT's rule, or --adapter_dim)")
register_method("lora", LoraConfig, _ATTACH + "attach_lora", peft=True,
                trains="peft LoRA on q_proj,v_proj (--lora_target_modules), r from LIFT's rule, alpha 1")
register_method("full", MethodConfig, _ATTACH + "attach_full_blocks", **_BLOCKS,
                trains="every weight of the transformer blocks (LIFT's full fine-tuning; embeddings and pre/post LN "
                       "frozen)")
register_method("bitfit", MethodConfig, _ATTACH + "attach_bitfit", **_BLOCKS,
                trains="the biases of the transformer blocks (LIFT's BitFit)")
register_method("head", MethodConfig, _ATTACH + "attach_head", init_from=True, head_only=True, partial=False,
                trains="the head only, on cached features (LOS / LT-Soups stage 2)")
register_method("full_all", MethodConfig, _ATTACH + "attach_full_all", init_from=True, partial=False,
                trains="every weight (embeddings, blocks, pre/post LN, adapters of an --init_from export, head; "
                       "LT-Soups)")
register_method("bitfit_all", MethodConfig, _ATTACH + "attach_bitfit_all", init_from=True, partial=False,
                trains="every bias of the backbone (embeddings and pre/post LN too; BatchNorm shifts of a CNN)")
register_method("ln", MethodConfig, _ATTACH + "attach_layer_norms", **_BLOCKS,
                trains="the LayerNorms of the transformer blocks (weights and biases)")
# prompts are input tokens: an average of tokens is no average of the models' weights
register_method("vpt_shallow", PromptConfig, modules=True, soupable=False,
                trains="VPT-shallow: --vpt_len (10) prompt tokens before the first tuned block")
register_method("vpt_deep", PromptConfig, modules=True, soupable=False,
                trains="VPT-deep: --vpt_len (10) new prompt tokens before every tuned block")
register_method("adapter", RankConfig, modules=True,
                trains="sequential bottleneck adapters after each MLP (r from LIFT's rule, or --adapter_dim)")
register_method("mask", MaskConfig, modules=True,
                trains="sparse fine-tuning: random entries of every Linear of the blocks (LIFT's ratio K/(12 L D), "
                       "floored to 0.001, or --mask_ratio; --mask_seed)")
register_method("lora_mlp", LoraMlpConfig, _ATTACH + "attach_lora", peft=True,
                trains="peft LoRA on the two Linears of each MLP (fc1, fc2), r from LIFT's rule, alpha 1")
register_method("ssf_attn", MethodConfig, modules=True,
                trains="SSF scale and shift after the attention's q, k, v and output projections")
register_method("ssf_mlp", MethodConfig, modules=True,
                trains="SSF scale and shift after the MLP's two Linears")
register_method("ssf_ln", MethodConfig, modules=True,
                trains="SSF scale and shift after the blocks' two LayerNorms")
