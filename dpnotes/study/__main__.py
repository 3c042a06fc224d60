from dpnotes.study.parts import main

main()
