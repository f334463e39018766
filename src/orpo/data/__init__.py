"""Stage 1, data: preference rows from files, the Hub or the builtin task generator -> canonical messages ->
token ids with their prompt/response boundaries; the data doctor (`orpo data inspect`) and the pair sampler.

May import: orpo.config, orpo.files.
"""
