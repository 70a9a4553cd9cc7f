"""From rows to batches: dataset formats, templates, fixed-shape examples, loading and the DataModules."""
