"""argparse helpers shared by the commands: values checked where they enter, with messages that say what is
expected (argparse prints `tvrn CMD: error: argument --OPTION: MESSAGE` and exits with status 2)."""
from __future__ import annotations

import argparse

INT_MAX = 2**31 - 1  # counts beyond this are typing mistakes (and overflow torch's int32 sizes)


def int_range(minimum: int, maximum: int = INT_MAX):
    """An argparse `type=`: an integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_range(1)  # batch sizes, epochs, workers, k
non_negative_int = int_range(0)  # queue lengths, shortlists, indices


def positive_float(text: str) -> float:
    """An argparse `type=`: a finite number > 0 (timeouts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def port(text: str) -> int:
    """An argparse `type=`: a TCP port, 0 (any free port) to 65535."""
    return int_range(0, 65535)(text)


def non_empty_token(text: str) -> str:
    """An argparse `type=` for `tvrn serve --token`: an empty token would mean no authentication at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty --token would switch authentication off; leave --token out for "
                                         "no token")
    return text


class IntermixedArgumentParser(argparse.ArgumentParser):
    """A (sub)parser that takes options anywhere among its positionals (`tvrn search INDEX -k 2 "a red ball"`):
    argparse's default stops filling positionals at the first option, so a trailing optional positional after
    the options would be an 'unrecognized argument'."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back here (Python <= 3.11)
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False
