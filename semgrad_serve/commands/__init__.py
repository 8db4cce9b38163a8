"""One module per ``semgrad-serve`` subcommand, named as the subcommand: ``add_arguments(parser)`` and ``run(args)``."""
