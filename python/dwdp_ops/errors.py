"""Exceptions raised by dwdp_ops. Every failure the library can diagnose becomes one of these, with a message that
names what was wrong and what was expected."""


class DwdpError(RuntimeError):
    """A runtime failure: no GPU, a lifecycle misuse, a collective that ranks disagree on, a native error."""


class RendezvousError(DwdpError):
    """The TCP control plane failed: a rank never arrived, died, or disagreed with rank 0. The message names the
    ranks concerned."""
