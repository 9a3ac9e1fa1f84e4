"""`--torch_compile`: torch.compile through accelerate's TorchDynamoPlugin, with the state dict keys of an eager run.

accelerate wraps the prepared model in torch.compile's OptimizedModule, whose parameter and state dict names gain
an `_orig_mod.` prefix. Resume states, EMA shadows and exports must not depend on the flag (a compiled run resumes
an eager checkpoint and vice versa; non-strict loading would silently skip renamed keys), so the compiled model's
`state_dict()` drops the prefix and its `load_state_dict()` accepts keys without it.
"""
COMPILE_PREFIX = "_orig_mod."


def compile_backends():
    """The torch.compile backends torch knows (the choices of --torch_compile_backend; read only when one is passed)."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


def dynamo_plugin(compile_spec):
    """accelerate's TorchDynamoPlugin for a spec.CompileSpec (backend "no" without --torch_compile)."""
    from accelerate.utils import TorchDynamoPlugin

    if not compile_spec.torch_compile:
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=compile_spec.torch_compile_backend or "inductor",
                             mode=compile_spec.torch_compile_mode)


def plain_name(name):
    """A parameter or state dict name as in the eager model."""
    return name.replace(COMPILE_PREFIX, "")


def keep_eager_state_keys(model):
    """On a compiled (prepared) model: state_dict() without `_orig_mod.`, load_state_dict() taking eager keys."""
    if not hasattr(model, "_orig_mod"):
        return model
    model.register_state_dict_post_hook(_strip_prefix)
    model.register_load_state_dict_pre_hook(_add_prefix)
    return model


def _strip_prefix(module, state_dict, prefix, local_metadata):
    items = list(state_dict.items())
    state_dict.clear()
    state_dict.update((plain_name(k), v) for k, v in items)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + COMPILE_PREFIX)]:
        state_dict[prefix + COMPILE_PREFIX + key[len(prefix):]] = state_dict.pop(key)
