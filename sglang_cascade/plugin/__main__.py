"""`python -m sglang_cascade.plugin --help`: the flags the plugin adds to SGLang's launcher."""

from .flags import cascade_parser

if __name__ == "__main__":
    cascade_parser().parse_args()
