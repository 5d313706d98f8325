"""The `farm` command line, a front door on the library (`farm/`), like `api/` and `workers/`.

`main` holds the commands (later groups register from `cmd_<area>.py`), `render` the terminal output, `spec_help`
`farm spec`, `demo` `farm demo`. Nothing outside this package imports it. A command that starts another front
door (`farm worker`, `farm api`) imports it inside the command, so importing the CLI loads neither
(tests/test_layering.py).
"""
