"""What builds the documentation site's generated pages (mkdocs.yml `hooks:` runs hooks.py) and what the docs
tests check: the configuration reference from the config dataclasses (config_ref.py), the command-line
reference from the argparse parser (cli_ref.py), and the code blocks of the site and README (blocks.py).
Nothing here is imported by the captioner package."""
