"""Lightning glue: the FV module, callbacks and the training CLI."""
