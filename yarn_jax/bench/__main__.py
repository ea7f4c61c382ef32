"""python -m yarn_jax.bench COMMAND [options]; COMMAND is one of COMMANDS below."""

import importlib
import sys

COMMANDS = {"convert": "convert_bench", "ring-memory": "ring_memory", "attention": "attention_bench",
            "train-step": "train_step_bench", "reproduce": "reproduce",
            "tpu-aot": "tpu_aot", "profile": "profile_step", "mosaic-probe": "mosaic_probe",
            "generate": "generate_bench", "real-model": "real_model", "layer-ops": "layer_ops"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        import difflib

        got = sys.argv[1] if len(sys.argv) > 1 else None
        near = difflib.get_close_matches(got or "", COMMANDS, n=1)
        print(f"error: COMMAND: expected one of {list(COMMANDS)}, got {got!r}"
              + (f" (did you mean {near[0]!r}?)" if near else ""), file=sys.stderr)
        sys.exit(2)
    from yarn_jax import cli

    module = importlib.import_module(f"yarn_jax.bench.{COMMANDS[sys.argv[1]]}")
    sys.exit(cli.run(lambda: module.main(sys.argv[2:])))  # a bad flag or config value: one line
