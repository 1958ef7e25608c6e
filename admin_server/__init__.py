"""The admin server of a cell: published models, replica placement, server membership."""
