"""``fastimp backends``: which kernels are available here, and why not."""


def add_parser(sub):
    p = sub.add_parser("backends", help="list the available kernel backends per op and device")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastimp._backend import format_backends
    print("op                     dev    backend avail reason   (* = picked by backend='auto')")
    print(format_backends())
    return 0
