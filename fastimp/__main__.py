import sys

try:
    from fastimp.cli import main
except KeyboardInterrupt:
    print("fastimp: interrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
