"""python -m yarn_jax.bench {convert} [options]"""

import sys

from yarn_jax.bench import convert_bench

COMMANDS = {"convert": convert_bench.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m yarn_jax.bench {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
