"""``python -m sockctl``: the same command as the ``sockctl`` script."""

from sockctl.cli import main

if __name__ == "__main__":
    main(prog_name="sockctl")
