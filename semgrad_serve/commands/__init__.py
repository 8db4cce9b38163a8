"""One module per ``semgrad-serve`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
