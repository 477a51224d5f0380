"""The command-line tools (installed as the package ``dcp_tools``, with ``dcp-*`` commands; also runnable as
``python tools/<name>.py`` from a checkout after ``make setup``). Each tool's ``main(argv)`` returns an exit
code; the logic they share with the library lives in ``dcp_backend``."""
