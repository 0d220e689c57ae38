from volcontrast.cli import main

main()
