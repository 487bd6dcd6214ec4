"""Packaging for llmhift: Sheared-LLaMA pruning, dynamic batch loading and HiFT as Composer plugins."""

from setuptools import find_packages, setup

# The pins are the stack DESIGN.md verified end to end on CPU: Composer 0.32.1 needs torch < 2.7.1
# and imports torchvision; mosaicml-streaming 0.13 needs transformers < 5.
install_requires = [
    "torch==2.7.0",
    "torchvision==0.22.0",
    "mosaicml==0.32.1",
    "mosaicml-streaming==0.13.0",
    "transformers>=4.57,<4.58",
    "tokenizers>=0.22,<0.23",
    "safetensors>=0.4",
    "omegaconf>=2.4,<2.5",
    "numpy<2.2",
    "tqdm",
    "matplotlib",  # llmhift.report's plots (Composer installs it too; the report must not rely on that)
]

extras_require = {
    # ruff is pinned: `make test` runs it, and its rules and import sorting move between releases.
    "test": ["pytest>=8", "pytest-timeout", "peft>=0.17,<0.19", "ruff==0.17.6",
             "lion-pytorch>=0.2.5,<0.3", "lm-eval>=0.4.13,<0.5"],
    "peft": ["peft>=0.17,<0.19"],  # model.peft: LoRA, AdaLoRA, IA3, prompt/prefix/P-tuning
    # bitsandbytes: optimizer.name adamw_8bit, paged_*, lion_8bit, and model.peft.quantize (QLoRA's 4-bit base)
    "gpu": ["flash-attn>=2.5", "bitsandbytes>=0.45"],
    "lion": ["lion-pytorch>=0.2.5,<0.3"],  # optimizer.name: lion
    "eval": ["lm-eval>=0.4.13,<0.5"],  # python -m llmhift.evaluate: downstream accuracy with the harness
}

setup(
    name="llmhift",
    version="0.1.0",
    description="Sheared-LLaMA pruning, DoReMi-style dynamic loading and HiFT as MosaicML Composer callbacks",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llmhift", "llmhift.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={
        "console_scripts": ["llmhift-composer-to-hf=llmhift.convert.composer_to_hf:main"],
        # llm-foundry's registry reads this group: `callbacks: {pruning: ...}` in an llm-foundry yaml
        # finds llmhift's callbacks with llmhift installed, and llmhift never imports llm-foundry.
        "llmfoundry_callbacks": [
            "pruning=llmhift.callbacks.pruning:PruningCallback",
            "data_loading=llmhift.callbacks.dynamic_loading:DynamicLoadingCallback",
            "hift=llmhift.callbacks.hift:HiFTCallback",
        ],
    },
)
