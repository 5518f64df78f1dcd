"""The gpt-oss model in Flax NNX."""

from numina_jax.model.config import GptOssConfig, tiny_config, yarn_inv_freq
from numina_jax.model.params import ParamSpec, count_params, init_params, param_specs
from numina_jax.model.transformer import (REMAT_POLICIES, GptOss, abstract_model, check_params,
                                          forward)

__all__ = ["GptOssConfig", "tiny_config", "yarn_inv_freq", "ParamSpec", "count_params", "init_params",
           "param_specs",
           "REMAT_POLICIES", "GptOss", "abstract_model", "check_params", "forward"]
